"""HTTP steps against hostile servers and hostile DNS (issue 20, items 1, 2 and 8).

- Cookies: the worker's one client is shared by every tenant, so it keeps no cookie at all.
- Decompression bombs: the body is capped in bytes received and in bytes decoded, decoded in
  bounded steps, one gzip/deflate layer at most, unknown codings refused.
- IPv6 forms of internal addresses under ``public``: only global unicast, the IPv4-embedding and
  reserved ranges blocked by name, at the up-front check and at connect time.

Real servers on 127.0.0.1 (threaded ``http.server``); DNS is substituted through the event
loop's resolver (``loop.getaddrinfo``), which is the resolver the policy and anyio both use.
No database is needed. The acceptance twins (a real ``serve``) are in tests/acceptance/test_http.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import socket
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest

from pgdurable.errors import HttpStepError
from pgdurable.steps.http_policy import (
    MAX_RESPONSE_BYTES_DEFAULT,
    HttpPolicy,
    blocked_reason,
    check_url,
)
from pgdurable.steps.http_step import make_client, run_http

LOCAL = HttpPolicy(mode="allow-list", allow=("127.0.0.1",))
MiB = 1024 * 1024


# --------------------------------------------------------------------------- bombs


def gzip_zeros(n: int) -> bytes:
    """gzip of ``n`` zero bytes, made in 1 MiB steps (1 GiB gives about 1 MB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(MiB)
    out = [z.compress(zeros) for _ in range(n // MiB)]
    out.append(z.flush())
    return b"".join(out)


@functools.cache
def gzip_bomb() -> bytes:
    """One gzip layer: about 1 MB that inflates to 1 GiB."""
    return gzip_zeros(1024 * MiB)


@functools.cache
def gzip_gzip_bomb() -> bytes:
    """Two gzip layers (``Content-Encoding: gzip, gzip``): 1,827 bytes that inflate to 1 GiB."""
    return gzip.compress(gzip_bomb(), 9)


# --------------------------------------------------------------------------- server


@dataclass
class Hit:
    path: str
    headers: dict[str, str]


@dataclass
class Site:
    """A threaded server on 127.0.0.1 that records requests and answers from ``routes``."""

    server: ThreadingHTTPServer
    hits: list[Hit] = field(default_factory=list)
    # path -> (status, headers, body, send Content-Length)
    routes: dict[str, tuple[int, list[tuple[str, str]], bytes, bool]] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def cookies_seen(self) -> list[str | None]:
        return [hit.headers.get("cookie") for hit in self.hits]


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            site.hits.append(Hit(self.path, headers))
            path = self.path.split("?")[0]
            if path in site.routes:
                status, extra, body, length = site.routes[path]
            else:  # echo what the server received (the step's result shows it)
                status, extra, length = 200, [("Content-Type", "application/json")], True
                body = json.dumps({"path": self.path, "headers": headers}).encode()
            self.send_response(status)
            for name, value in extra:
                self.send_header(name, value)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()  # HTTP/1.0: without Content-Length the body ends at close
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        do_POST = do_GET

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def serving() -> Iterator[Site]:
    server = _Server(("127.0.0.1", 0), BaseHTTPRequestHandler)
    site = Site(server)
    server.RequestHandlerClass = _handler(site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def _sites() -> Iterator[tuple[Site, Site]]:
    with serving() as one, serving() as two:
        yield one, two


def _fresh(s: Site) -> Site:
    s.hits.clear()
    s.routes.clear()
    return s


@pytest.fixture
def site(_sites: tuple[Site, Site]) -> Site:
    return _fresh(_sites[0])


@pytest.fixture
def other_site(_sites: tuple[Site, Site]) -> Site:
    """A second server on another port (cookies ignore ports)."""
    return _fresh(_sites[1])


# --------------------------------------------------------------------------- DNS


class FakeDNSLoop(asyncio.SelectorEventLoop):
    """An event loop whose resolver answers some names from a table, others for real."""

    answers: ClassVar[dict[str, list[str]]] = {}

    async def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode("ascii") if isinstance(host, bytes) else host
        if name not in self.answers:
            return await super().getaddrinfo(host, port, *args, **kwargs)
        port = int(port or 0)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in self.answers[name]
        ]


def run_with_dns(answers: dict[str, list[str]], coro_fn: Any) -> Any:
    FakeDNSLoop.answers = answers
    with asyncio.Runner(loop_factory=FakeDNSLoop) as runner:
        return runner.run(coro_fn())


# --------------------------------------------------------------------------- helpers


def call(url: str, *, policy: HttpPolicy = LOCAL, headers: Any = None, key: str = "k") -> Any:
    async def main() -> Any:
        async with make_client(policy) as client:
            return await run_http(
                client, policy, "HTTP", {"url": url, "method": "GET", "headers": headers}, key
            )

    return asyncio.run(main())


def traced_peak(fn: Any) -> tuple[Any, int]:
    """(fn()'s result or exception, the peak bytes Python allocated while it ran)."""
    tracemalloc.start()
    try:
        try:
            result: Any = fn()
        except Exception as exc:  # the caller inspects it
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# =========================================================================== 1. cookies


def test_one_tenants_cookie_never_reaches_anothers_request(site: Site, other_site: Site) -> None:
    """B gets a session cookie from an API; A's later call to that API carries none, and a
    cookie A's own server plants (another port: cookies ignore ports) never reaches B."""
    site.routes["/login"] = (200, [("Set-Cookie", "session=b-secret; Path=/")], b"hi B", True)
    other_site.routes["/plant"] = (
        200,
        [("Set-Cookie", "planted=a-evil; Path=/"), ("Set-Cookie", "wide=1; Domain=127.0.0.1")],
        b"planted",
        True,
    )

    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1", "localhost"))

    async def main() -> list[Any]:
        async with make_client(policy) as client:  # the worker's one client

            def get(url: str, key: str) -> Any:
                return run_http(client, policy, "HTTP", {"url": url, "method": "GET"}, key)

            return [
                await get(site.url("/login"), "tenant-b-1"),
                await get(site.url("/api/a"), "tenant-a-1"),
                await get(other_site.url("/plant"), "tenant-a-2"),
                await get(site.url("/api/b"), "tenant-b-2"),
                await get(site.url("/api/b", host="localhost"), "tenant-b-3"),
                len(client.cookies.jar),
            ]

    login, a_result, _, b_result, _, stored = asyncio.run(main())
    assert login["headers"]["set-cookie"] == "session=b-secret; Path=/"  # B sees its own
    assert site.cookies_seen() == [None, None, None, None]
    assert other_site.cookies_seen() == [None]
    assert "b-secret" not in json.dumps(a_result)  # nothing for A's df.result to show
    assert "a-evil" not in json.dumps(b_result)
    assert stored == 0


def test_a_domain_cookie_for_a_public_suffix_is_never_stored(site: Site) -> None:
    """``Domain=co.uk`` set by one *.co.uk host is not sent to another (no jar, no match)."""
    site.routes["/set"] = (200, [("Set-Cookie", "tracker=1; Domain=co.uk; Path=/")], b"", True)
    policy = HttpPolicy(mode="allow-list", allow=("*.co.uk",))
    names = {"api.tenant-b.co.uk": ["127.0.0.1"], "api.tenant-a.co.uk": ["127.0.0.1"]}

    async def main() -> int:
        async with make_client(policy) as client:
            for host, path in (("api.tenant-b.co.uk", "/set"), ("api.tenant-a.co.uk", "/get")):
                config = {"url": site.url(path, host=host), "method": "GET"}
                await run_http(client, policy, "HTTP", config, "k")
            return len(client.cookies.jar)

    assert run_with_dns(names, main) == 0
    assert [hit.path for hit in site.hits] == ["/set", "/get"]
    assert site.cookies_seen() == [None, None]


def test_a_cookie_the_workflow_sends_explicitly_still_goes(site: Site) -> None:
    result = call(site.url("/echo"), headers={"Cookie": "session=mine"})
    assert json.loads(result["body"])["headers"]["cookie"] == "session=mine"
    assert site.cookies_seen() == ["session=mine"]


def test_cookies_set_on_the_client_by_code_are_dropped_too(site: Site) -> None:
    async def main() -> int:
        async with make_client(LOCAL) as client:
            client.cookies.set("injected", "1", domain="127.0.0.1")
            await run_http(client, LOCAL, "HTTP", {"url": site.url("/x"), "method": "GET"}, "k")
            return len(client.cookies.jar)

    assert asyncio.run(main()) == 0
    assert site.cookies_seen() == [None]


def test_run_http_refuses_a_client_that_keeps_cookies(site: Site) -> None:
    async def main() -> None:
        async with httpx.AsyncClient() as client:
            await run_http(client, LOCAL, "HTTP", {"url": site.url("/x"), "method": "GET"}, "k")

    with pytest.raises(HttpStepError, match="keeps cookies"):
        asyncio.run(main())
    assert site.hits == []


# =========================================================================== 2. bombs


def test_gzip_of_gzip_bomb_is_refused_without_inflating(site: Site) -> None:
    bomb = gzip_gzip_bomb()
    assert len(bomb) < 2048
    site.routes["/bomb"] = (
        200,
        [("Content-Type", "application/octet-stream"), ("Content-Encoding", "gzip, gzip")],
        bomb,
        True,
    )
    error, peak = traced_peak(lambda: call(site.url("/bomb")))
    assert isinstance(error, HttpStepError), error
    assert "2 Content-Encoding layers ('gzip, gzip')" in str(error)
    assert f"{MAX_RESPONSE_BYTES_DEFAULT}-byte" in str(error)  # the message names the cap
    print(f"gzip-of-gzip bomb ({len(bomb)} bytes): peak Python allocation {peak / MiB:.1f} MiB")
    assert peak < 16 * MiB


def test_two_content_encoding_header_lines_are_two_layers(site: Site) -> None:
    site.routes["/two"] = (
        200,
        [("Content-Encoding", "gzip"), ("Content-Encoding", "deflate")],
        zlib.compress(gzip.compress(b"x")),
        True,
    )
    with pytest.raises(HttpStepError, match="2 Content-Encoding layers"):
        call(site.url("/two"))


def test_single_layer_gzip_bomb_stops_at_the_cap(site: Site) -> None:
    bomb = gzip_bomb()
    site.routes["/bomb1"] = (200, [("Content-Encoding", "gzip")], bomb, True)
    error, peak = traced_peak(lambda: call(site.url("/bomb1")))
    assert isinstance(error, HttpStepError), error
    assert f"{MAX_RESPONSE_BYTES_DEFAULT}-byte response cap" in str(error)
    assert "decodes (gzip) to more than" in str(error)
    print(f"1 GiB gzip bomb ({len(bomb)} bytes): peak Python allocation {peak / MiB:.1f} MiB")
    # the decoded body is held up to the cap (10 MiB), plus one raw chunk and zlib's window
    assert peak < MAX_RESPONSE_BYTES_DEFAULT + 4 * MiB


def test_decoded_cap_is_exact(site: Site) -> None:
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_response_bytes=100_000)
    site.routes["/fits"] = (
        200,
        [("Content-Encoding", "gzip")],
        gzip.compress(b"a" * 100_000),
        True,
    )
    site.routes["/over"] = (
        200,
        [("Content-Encoding", "gzip")],
        gzip.compress(b"a" * 100_001),
        True,
    )
    assert call(site.url("/fits"), policy=policy)["body"] == "a" * 100_000
    with pytest.raises(HttpStepError, match="decodes \\(gzip\\) to more than the 100000-byte"):
        call(site.url("/over"), policy=policy)


def test_deflate_bomb_stops_at_the_cap(site: Site) -> None:
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_response_bytes=MiB)
    site.routes["/zlib"] = (
        200,
        [("Content-Encoding", "deflate")],
        zlib.compress(bytes(64 * MiB)),
        True,
    )
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    site.routes["/raw"] = (
        200,
        [("Content-Encoding", "deflate")],
        raw.compress(bytes(64 * MiB)) + raw.flush(),
        True,
    )
    for path in ("/zlib", "/raw"):
        error, peak = traced_peak(lambda p=path: call(site.url(p), policy=policy))
        assert isinstance(error, HttpStepError), (path, error)
        assert f"decodes (deflate) to more than the {MiB}-byte response cap" in str(error)
        assert peak < 8 * MiB, (path, peak)


def test_raw_bytes_are_capped_even_when_they_decode_to_nothing(site: Site) -> None:
    """A close-delimited body of empty gzip members: 0 decoded bytes, but it keeps coming."""
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_response_bytes=10_000)
    body = gzip.compress(b"") * 2000  # ~40 KB, no Content-Length
    site.routes["/empties"] = (200, [("Content-Encoding", "gzip")], body, False)
    with pytest.raises(HttpStepError, match="exceeds the 10000-byte response cap"):
        call(site.url("/empties"), policy=policy)


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "x-custom"])
def test_unknown_content_encoding_fails_clearly(site: Site, coding: str) -> None:
    site.routes["/enc"] = (200, [("Content-Encoding", coding)], b"\x1b\x00opaque", True)
    with pytest.raises(
        HttpStepError, match=f"Content-Encoding '{coding}', which HTTP steps do not"
    ):
        call(site.url("/enc"))


def test_corrupt_gzip_fails_clearly(site: Site) -> None:
    site.routes["/bad"] = (200, [("Content-Encoding", "gzip")], b"\x1f\x8bnot gzip at all", True)
    with pytest.raises(HttpStepError, match="corrupt gzip body"):
        call(site.url("/bad"))


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),  # zlib-wrapped, as RFC 9110 says
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
        ("identity", lambda b: b),
        ("gzip, identity", gzip.compress),
        ("", lambda b: b),
    ],
)
def test_one_layer_still_decodes(site: Site, coding: str, encode: Any) -> None:
    text = "héllo " * 5000
    site.routes["/ok"] = (
        200,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Encoding", coding)],
        encode(text.encode()),
        True,
    )
    result = call(site.url("/ok"))
    assert (result["body"], result["encoding"]) == (text, "text")


def test_empty_gzip_body_of_a_204(site: Site) -> None:
    site.routes["/none"] = (204, [("Content-Encoding", "gzip")], b"", True)
    assert call(site.url("/none"))["body"] == ""


def test_accept_encoding_is_exactly_what_is_decoded(site: Site) -> None:
    result = call(site.url("/echo"))
    assert json.loads(result["body"])["headers"]["accept-encoding"] == "gzip, deflate"


def test_5xx_preview_of_a_gzip_body_is_decoded(site: Site) -> None:
    site.routes["/err"] = (503, [("Content-Encoding", "gzip")], gzip.compress(b"down " * 10), True)
    with pytest.raises(HttpStepError, match=r"HTTP 503 .*: down down"):
        call(site.url("/err"))


# =========================================================================== 8. IPv6


# Every IPv6 form the issue named, then one address in each range blocked by name.
BLOCKED_V6 = [
    ("64:ff9b:1::7f00:1", "local-use NAT64"),
    ("::ffff:0:7f00:1", "IPv4-translated"),
    ("::7f00:1", "IPv4-compatible"),
    ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "IPv4-mapped"),
    ("::ffff:8.8.8.8", "IPv4-mapped"),
    ("::ffff:0:808:808", "IPv4-translated"),
    ("::808:808", "IPv4-compatible"),
    ("64:ff9b::7f00:1", "NAT64"),
    ("64:ff9b::808:808", "NAT64"),
    ("64:ff9b:1:ffff::1", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 of a loopback address"),
    ("2002:a9fe:a9fe::1", "6to4 of a cloud metadata address"),
    ("2002:a00:1::", "6to4 of a private address"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2001::1", "Teredo"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("fd00:ec2::254", "unique-local"),  # AWS's IPv6 metadata address
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("febf::1", "link-local"),
    ("fef0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("100::1", "discard"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("4000::1", "not IPv6 global unicast"),
    ("5f00::1", "not IPv6 global unicast"),
    ("e000::1", "not IPv6 global unicast"),
    ("::2:0:0:1", "not IPv6 global unicast"),
    ("2001:2::1", "non-public"),  # benchmarking, inside 2001::/23: ipaddress knows it
    ("2001:10::1", "non-public"),  # ORCHID
]


@pytest.mark.parametrize(("address", "reason"), BLOCKED_V6)
def test_ipv6_blocked_reason(address: str, reason: str) -> None:
    assert blocked_reason(address) == reason


@pytest.mark.parametrize(
    "address",
    [
        "2606:4700:4700::1111",
        "2a00:1450:4001:82b::200e",
        "2001:4860:4860::8888",
        "2400:cb00::1",
        "2002:808:808::1",  # 6to4 of a public IPv4 address
        "3ffe::1",  # global unicast outside the named ranges
    ],
)
def test_ipv6_global_unicast_is_public(address: str) -> None:
    assert blocked_reason(address) is None


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("192.0.0.8", "IETF protocol assignments"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("192.88.99.1", "6to4 relay anycast"),
        ("240.0.0.1", "reserved"),
        ("239.255.255.250", "multicast"),
        ("255.255.255.255", "broadcast"),
    ],
)
def test_ipv4_reserved_ranges_are_named(address: str, reason: str) -> None:
    assert blocked_reason(address) == reason


ISSUE_FORMS = ["64:ff9b:1::7f00:1", "::ffff:0:7f00:1", "::7f00:1", "fec0::1"]


@pytest.mark.parametrize("address", [*ISSUE_FORMS, "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe"])
def test_public_up_front_check_blocks_ipv6_forms(address: str) -> None:
    with pytest.raises(HttpStepError, match="resolves to a blocked address") as info:
        run_with_dns(
            {"api.example.com": ["93.184.215.14", address]},
            lambda: check_url(HttpPolicy(), "https://api.example.com/v1"),
        )
    assert f"{address} (" in str(info.value)


@pytest.mark.parametrize("address", [*ISSUE_FORMS, "::ffff:127.0.0.1"])
def test_public_connect_time_check_blocks_ipv6_forms(site: Site, address: str) -> None:
    """The client itself (no check_url) refuses: what stops a rebinding answer."""
    url = site.url("/x", host="rebind.example.com")

    async def main() -> None:
        async with make_client(HttpPolicy()) as client:
            await client.get(url)

    with pytest.raises(HttpStepError, match="resolves to a blocked address") as info:
        run_with_dns({"rebind.example.com": [address]}, main)
    assert address in str(info.value)
    assert site.hits == []


def test_a_mapped_address_really_reaches_loopback_and_public_refuses_it(site: Site) -> None:
    """The whole step: the name answers ::ffff:127.0.0.1, which connects to this 127.0.0.1
    server under an allow-list naming it (so the address is a real way in), and not under
    ``public``."""
    names = {"mapped.example.com": ["::ffff:127.0.0.1"]}
    url = site.url("/in", host="mapped.example.com")

    async def step(policy: HttpPolicy) -> Any:
        async with make_client(policy) as client:
            return await run_http(client, policy, "HTTP", {"url": url, "method": "GET"}, "k")

    with pytest.raises(HttpStepError, match=r"::ffff:127\.0\.0\.1 \(IPv4-mapped\)"):
        run_with_dns(names, lambda: step(HttpPolicy()))
    assert site.hits == []
    allowed = HttpPolicy(mode="allow-list", allow=("mapped.example.com",))
    assert run_with_dns(names, lambda: step(allowed))["status"] == 200
    assert [hit.path for hit in site.hits] == ["/in"]
