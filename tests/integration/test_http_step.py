"""HTTP step against real HTTP servers on 127.0.0.1: envelope, bodies, statuses, caps, policy.

Two servers: pytest-httpserver (werkzeug) for request inspection and canned responses, and a
small threaded ``http.server`` for what werkzeug cannot do on demand (sleeping, dripping,
close-delimited and gzip bodies). No database is needed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Request, Response

import pgdurable
from pgdurable.errors import ConfigError, HttpStepError
from pgdurable.steps.http_policy import (
    MAX_REQUEST_BYTES_DEFAULT,
    MAX_RESPONSE_BYTES_DEFAULT,
    MAX_TIMEOUT_SECONDS_DEFAULT,
    HttpPolicy,
    blocked_reason,
    check_url,
)
from pgdurable.steps.http_step import make_client, render_body, run_http

LOCAL = HttpPolicy(mode="allow-list", allow=("127.0.0.1",))
KEY = "instance-42/node-7"
ENVELOPE_KEYS = {"status", "body", "encoding", "headers", "ok", "duration_ms"}


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def _werkzeug() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    yield server
    server.clear()
    server.stop()


@pytest.fixture
def srv(_werkzeug: HTTPServer) -> Iterator[HTTPServer]:
    _werkzeug.clear()
    yield _werkzeug
    _werkzeug.check_assertions()
    _werkzeug.clear()


class _SlowHandler(BaseHTTPRequestHandler):
    """Routes: /sleep?s=, /drip?n=&every=, /stream?n= (no Content-Length), /gzip?n=."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/sleep":
            time.sleep(float(q["s"]))  # the point of this endpoint: a slow server
            self._send(200, b"slept")
        elif parts.path == "/drip":
            n, every = int(q["n"]), float(q["every"])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            try:
                for _ in range(n):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(every)
            except OSError:
                pass  # the client gave up, as the test wants
        elif parts.path == "/stream":
            # HTTP/1.0 without Content-Length: the body ends when the connection closes.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            try:
                for _ in range(int(q["n"]) // 1000):
                    self.wfile.write(b"\xff" * 1000)
            except OSError:
                pass
        elif parts.path == "/gzip":
            self._send(200, gzip.compress(b"\0" * int(q["n"])), encoding="gzip")
        else:
            self._send(404, b"no route")

    def _send(self, status: int, body: bytes, encoding: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 50+ simultaneous connects must not overflow the backlog


@pytest.fixture(scope="module")
def slow() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, name="slow-http", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------- helpers


async def _call(policy: HttpPolicy, node_type: Any, config: dict[str, Any], key: str) -> Any:
    async with make_client(policy) as client:
        return await run_http(client, policy, node_type, config, key)


def call(
    config: dict[str, Any],
    *,
    node_type: str = "HTTP",
    policy: HttpPolicy = LOCAL,
    key: str = KEY,
) -> dict[str, Any]:
    result: dict[str, Any] = asyncio.run(_call(policy, node_type, config, key))
    return result


def fails(config: dict[str, Any], match: str, **kw: Any) -> str:
    with pytest.raises(HttpStepError, match=match) as info:
        call(config, **kw)
    return str(info.value)


def check(policy: HttpPolicy, url: str) -> None:
    asyncio.run(check_url(policy, url))


class Captured:
    """A werkzeug handler that records what the server received."""

    def __init__(self, response: Response | None = None) -> None:
        self.response = response or Response("ok", content_type="text/plain")
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: Request) -> Response:
        entry: dict[str, Any] = {
            "method": request.method,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "content_type": request.headers.get("Content-Type"),
        }
        if request.mimetype == "multipart/form-data":
            entry["form"] = {k: v for k, v in request.form.items()}
            entry["files"] = {
                k: (f.filename, f.content_type, f.read()) for k, f in request.files.items()
            }
        else:
            entry["data"] = request.get_data()
        self.requests.append(entry)
        return self.response


# --------------------------------------------------------------------------- envelope


def test_get_returns_every_envelope_field(srv: HTTPServer) -> None:
    srv.expect_request("/thing", method="GET").respond_with_data(
        '{"a": 1}', status=200, content_type="application/json", headers={"X-Thing": "yes"}
    )
    result = call({"url": srv.url_for("/thing"), "method": "get", "timeout_seconds": 5})
    assert set(result) == ENVELOPE_KEYS
    assert result["status"] == 200
    assert result["ok"] is True
    assert result["encoding"] == "text"
    assert json.loads(result["body"]) == {"a": 1}
    assert result["headers"]["x-thing"] == "yes"
    assert result["headers"]["content-type"] == "application/json"
    assert all(name == name.lower() for name in result["headers"])
    assert isinstance(result["duration_ms"], int)
    assert 0 <= result["duration_ms"] < 5000
    json.dumps(result)  # the envelope is JSON-serialisable as stored


def test_repeated_response_headers_are_joined(srv: HTTPServer) -> None:
    resp = Response("x", content_type="text/plain")
    resp.headers.add("X-Multi", "a")
    resp.headers.add("X-Multi", "b")
    srv.expect_request("/multi").respond_with_response(resp)
    result = call({"url": srv.url_for("/multi"), "method": "GET"})
    assert result["headers"]["x-multi"] == "a, b"


def test_body_is_sent_verbatim_without_default_content_type(srv: HTTPServer) -> None:
    handler = Captured()
    srv.expect_request("/post").respond_with_handler(handler)
    raw = '{"not": "parsed"} & raw \u00e9'
    call({"url": srv.url_for("/post"), "method": "put", "body": raw})
    (got,) = handler.requests
    assert got["method"] == "PUT"
    assert got["data"] == raw.encode("utf-8")
    assert got["content_type"] is None


def test_no_body_and_default_method_and_timeout(srv: HTTPServer) -> None:
    handler = Captured()
    srv.expect_request("/default").respond_with_handler(handler)
    result = call({"url": srv.url_for("/default")})
    assert result["status"] == 200
    (got,) = handler.requests
    assert got["method"] == "POST"
    assert got["data"] == b""


def test_idempotency_key_and_user_agent(srv: HTTPServer) -> None:
    handler = Captured()
    srv.expect_request("/key").respond_with_handler(handler)
    headers = {"Idempotency-Key": "caller-chosen", "User-Agent": "curl/1"}
    call({"url": srv.url_for("/key"), "method": "GET", "headers": headers}, key="wf-1/n-3")
    (got,) = handler.requests
    assert got["headers"]["idempotency-key"] == "wf-1/n-3"
    assert got["headers"]["user-agent"] == f"pgdurable/{pgdurable.__version__}"


def test_only_string_headers_are_sent_and_framing_headers_are_ours(srv: HTTPServer) -> None:
    handler = Captured()
    srv.expect_request("/h").respond_with_handler(handler)
    headers = {
        "X-Str": "kept",
        "Content-Type": "application/json",
        "X-Num": 5,
        "X-Null": None,
        "X-List": ["a"],
        "X-Obj": {"a": "b"},
        "X-Bool": True,
        "Content-Length": "999",
        "Transfer-Encoding": "chunked",
        "Host": "evil.example",
    }
    call({"url": srv.url_for("/h"), "method": "POST", "body": "abc", "headers": headers})
    (got,) = handler.requests
    sent = got["headers"]
    assert sent["x-str"] == "kept"
    assert sent["content-type"] == "application/json"
    for dropped in ("x-num", "x-null", "x-list", "x-obj", "x-bool", "transfer-encoding"):
        assert dropped not in sent
    assert sent["content-length"] == "3"
    assert sent["host"] == srv.url_for("/").split("/")[2]
    assert got["data"] == b"abc"


def test_headers_that_are_not_an_object_are_ignored(srv: HTTPServer) -> None:
    srv.expect_request("/h2").respond_with_data("ok")
    assert call({"url": srv.url_for("/h2"), "headers": ["X-A", "1"]})["status"] == 200


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ({"X-A": "1\r\nX-Injected: yes"}, "line break"),
        ({"Bad Name": "1"}, "not a valid HTTP header name"),
    ],
)
def test_header_injection_fails_the_step(srv: HTTPServer, headers: Any, match: str) -> None:
    fails({"url": srv.url_for("/never"), "headers": headers}, match)
    assert srv.log == []


# --------------------------------------------------------------------------- response bodies


def test_binary_response_is_base64(srv: HTTPServer) -> None:
    payload = bytes(range(256))
    srv.expect_request("/bin").respond_with_data(payload, content_type="image/png")
    result = call({"url": srv.url_for("/bin"), "method": "GET"})
    assert result["encoding"] == "base64"
    assert base64.b64decode(result["body"]) == payload


def test_utf8_without_nul_is_text_whatever_the_content_type(srv: HTTPServer) -> None:
    srv.expect_request("/u").respond_with_data(
        "h\u00e9llo \u2713".encode(), content_type="application/octet-stream"
    )
    result = call({"url": srv.url_for("/u"), "method": "GET"})
    assert (result["encoding"], result["body"]) == ("text", "h\u00e9llo \u2713")


def test_textual_content_type_uses_its_charset(srv: HTTPServer) -> None:
    srv.expect_request("/l1").respond_with_data(
        b"caf\xe9", content_type="text/plain; charset=iso-8859-1"
    )
    result = call({"url": srv.url_for("/l1"), "method": "GET"})
    assert (result["encoding"], result["body"]) == ("text", "caf\u00e9")


def test_empty_body_is_empty_text(srv: HTTPServer) -> None:
    srv.expect_request("/empty").respond_with_data(b"", status=204)
    result = call({"url": srv.url_for("/empty"), "method": "DELETE"})
    assert result == {**result, "status": 204, "ok": True, "body": "", "encoding": "text"}


@pytest.mark.parametrize(
    ("body", "content_type", "encoding"),
    [
        (b"plain", "text/plain", "text"),
        (b"{}", "application/problem+json", "text"),
        (b"<a/>", "application/atom+xml", "text"),
        (b"a: 1", "application/yaml", "text"),
        (b"x=1", "application/x-www-form-urlencoded", "text"),
        (b"f()", "application/javascript", "text"),
        (b"{a}", "application/graphql", "text"),
        (b"\xff\xfe", "text/plain", "text"),  # textual: decoded with replacement
        (b"\xff\xfe", "application/octet-stream", "base64"),
        (b"a\x00b", "application/octet-stream", "base64"),
        (b"a\x00b", "text/plain", "base64"),  # jsonb cannot hold \u0000
        (b"\xe9", None, "base64"),
    ],
)
def test_render_body(body: bytes, content_type: str | None, encoding: str) -> None:
    text, got = render_body(body, content_type)
    assert got == encoding
    if got == "base64":
        assert base64.b64decode(text) == body


# --------------------------------------------------------------------------- statuses


def test_redirect_is_returned_not_followed(srv: HTTPServer) -> None:
    srv.expect_request("/from").respond_with_data(
        "moved", status=302, headers={"Location": srv.url_for("/to")}
    )
    result = call({"url": srv.url_for("/from"), "method": "GET"})
    assert result["status"] == 302
    assert result["ok"] is False
    assert result["headers"]["location"] == srv.url_for("/to")
    assert [req.path for req, _ in srv.log] == ["/from"]


@pytest.mark.parametrize("status", [400, 404, 409, 429])
def test_4xx_is_returned_with_ok_false(srv: HTTPServer, status: int) -> None:
    srv.expect_request("/c").respond_with_data("nope", status=status)
    result = call({"url": srv.url_for("/c"), "method": "GET"})
    assert (result["status"], result["ok"], result["body"]) == (status, False, "nope")


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_fails_with_a_512_char_preview(srv: HTTPServer, status: int) -> None:
    srv.expect_request("/err").respond_with_data("E" + "x" * 2000, status=status)
    url = srv.url_for("/err")
    message = fails({"url": url, "method": "GET"}, f"HTTP {status}")
    assert repr(url) in message
    assert "E" + "x" * 511 in message
    assert "x" * 512 not in message


def test_5xx_with_empty_body(srv: HTTPServer) -> None:
    srv.expect_request("/e").respond_with_data("", status=500)
    fails({"url": srv.url_for("/e"), "method": "GET"}, r"HTTP 500 .*\(empty body\)")


# --------------------------------------------------------------------------- timeouts, transport


def test_timeout_fails_the_step(slow: str) -> None:
    started = time.monotonic()
    fails({"url": f"{slow}/sleep?s=5", "method": "GET", "timeout_seconds": 0.5}, "timed out")
    assert time.monotonic() - started < 3


def test_timeout_bounds_the_whole_exchange_not_each_read(slow: str) -> None:
    # 1 byte every 0.2 s never trips a per-read timeout of 1 s; the total deadline must.
    url = f"{slow}/drip?n=50&every=0.2"
    started = time.monotonic()
    message = fails({"url": url, "method": "GET", "timeout_seconds": 1}, "timed out after 1s")
    assert repr(url) in message
    assert time.monotonic() - started < 4


def test_policy_caps_the_timeout(slow: str) -> None:
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_timeout_seconds=0.5)
    started = time.monotonic()
    config = {"url": f"{slow}/sleep?s=5", "method": "GET", "timeout_seconds": 3600}
    fails(config, "timed out after 0.5s", policy=policy)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("bad", [0, -1, "soon", True, [1]])
def test_invalid_timeout_fails(srv: HTTPServer, bad: Any) -> None:
    fails({"url": srv.url_for("/t"), "timeout_seconds": bad}, "timeout_seconds")


def test_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}/x"
    message = fails({"url": url, "method": "GET", "timeout_seconds": 5}, "could not connect")
    assert repr(url) in message


def test_dns_failure_names_the_url() -> None:
    policy = HttpPolicy(mode="allow-list", allow=("*.invalid",))
    url = "http://no-such-host.invalid/x"
    message = fails(
        {"url": url, "method": "GET", "timeout_seconds": 10}, re.escape(url), policy=policy
    )
    assert "could not connect" in message


def test_dns_failure_under_public_names_the_host() -> None:
    url = "http://no-such-host.invalid/x"
    with pytest.raises(HttpStepError, match=r"could not resolve host 'no-such-host\.invalid'"):
        check(HttpPolicy(), url)


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "", 5])
def test_unsupported_method_fails(srv: HTTPServer, method: Any) -> None:
    config = {"url": srv.url_for("/m"), "method": method}
    if method == "":
        # empty means the default (POST), like a NULL method
        srv.expect_request("/m").respond_with_data("ok")
        assert call(config)["status"] == 200
    else:
        fails(config, "not supported")


@pytest.mark.parametrize("config", [{}, {"url": ""}, {"url": 5}])
def test_missing_url_fails(config: dict[str, Any]) -> None:
    fails(config, "url")


# --------------------------------------------------------------------------- caps


def test_request_body_over_cap_fails_before_sending(srv: HTTPServer) -> None:
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_request_bytes=100)
    srv.expect_request("/cap").respond_with_data("ok")
    assert call({"url": srv.url_for("/cap"), "body": "a" * 100}, policy=policy)["ok"]
    fails({"url": srv.url_for("/cap"), "body": "a" * 101}, "100-byte request cap", policy=policy)
    assert len(srv.log) == 1


def test_response_over_cap_fails(srv: HTTPServer) -> None:
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_response_bytes=1000)
    srv.expect_request("/exact").respond_with_data(b"a" * 1000)
    srv.expect_request("/big").respond_with_data(b"a" * 1001)
    assert len(call({"url": srv.url_for("/exact"), "method": "GET"}, policy=policy)["body"]) == 1000
    fails({"url": srv.url_for("/big"), "method": "GET"}, "1000-byte response cap", policy=policy)


def test_response_without_length_is_cut_at_the_cap(slow: str) -> None:
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_response_bytes=50_000)
    config = {"url": f"{slow}/stream?n=2000000", "method": "GET", "timeout_seconds": 10}
    fails(config, "50000-byte response cap", policy=policy)
    small = call({**config, "url": f"{slow}/stream?n=50000"}, policy=policy)
    assert base64.b64decode(small["body"]) == b"\xff" * 50_000


def test_response_cap_counts_decoded_bytes(slow: str) -> None:
    # ~10 KB of gzip expanding to 10 MB: the cap applies to what we would store.
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_response_bytes=1_000_000)
    config = {"url": f"{slow}/gzip?n=10000000", "method": "GET", "timeout_seconds": 10}
    fails(config, "1000000-byte response cap", policy=policy)


# --------------------------------------------------------------------------- multipart


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_multipart_parts_as_the_server_received_them(srv: HTTPServer) -> None:
    handler = Captured()
    srv.expect_request("/upload", method="POST").respond_with_handler(handler)
    png = bytes(range(256)) * 4
    wrapped = "\n".join(b64(png)[i : i + 76] for i in range(0, len(b64(png)), 76))
    parts = [
        {"name": "meta", "data_b64": b64(b'{"a": 1}')},
        {"name": "image", "data_b64": wrapped, "filename": "pic.png", "content_type": "image/png"},
        {"name": "doc", "data_b64": f"  {b64(b'hello')}\t\n", "filename": "a.txt"},
    ]
    headers = {"Content-Type": "application/json", "X-Extra": "1", "X-Drop": 1}
    config = {"url": srv.url_for("/upload"), "method": "post", "parts": parts, "headers": headers}
    result = call(config, node_type="HTTP_MULTIPART")
    assert result["status"] == 200
    (got,) = handler.requests
    assert got["content_type"].startswith("multipart/form-data; boundary=")
    assert got["headers"]["x-extra"] == "1"
    assert "x-drop" not in got["headers"]
    assert got["headers"]["idempotency-key"] == KEY
    assert got["form"] == {"meta": '{"a": 1}'}
    assert got["files"] == {
        "image": ("pic.png", "image/png", png),
        "doc": ("a.txt", "application/octet-stream", b"hello"),
    }


def test_multipart_names_cannot_break_out_of_their_quotes(srv: HTTPServer) -> None:
    handler = Captured()
    srv.expect_request("/q").respond_with_handler(handler)
    parts = [{"name": 'a"; name="evil', "data_b64": b64(b"1"), "filename": 'f"\r\nX: y'}]
    call({"url": srv.url_for("/q"), "parts": parts}, node_type="HTTP_MULTIPART")
    (got,) = handler.requests
    # one part with its name intact (werkzeug undoes the WHATWG %22 escape); the CR LF in the
    # filename stays escaped, so it never reached the wire as a header break
    assert list(got["files"]) == ['a"; name="evil']
    assert got["files"]['a"; name="evil'][0] == 'f"%0D%0AX: y'


@pytest.mark.parametrize(
    ("parts", "method", "match"),
    [
        ([], "POST", "non-empty JSON array"),
        (None, "POST", "non-empty JSON array"),
        (["x"], "POST", "part 0 is not a JSON object"),
        ([{"data_b64": "AA=="}], "POST", "non-empty string 'name'"),
        ([{"name": "a"}], "POST", "base64 string 'data_b64'"),
        ([{"name": "a", "data_b64": "!!!"}], "POST", "'a': data_b64 is not valid base64"),
        ([{"name": "a", "data_b64": "AA==", "content_type": "x\r\ny"}], "POST", "one-line"),
        ([{"name": "a", "data_b64": "AA=="}], "GET", "not supported"),
    ],
)
def test_multipart_invalid_config_fails(
    srv: HTTPServer, parts: Any, method: str, match: str
) -> None:
    config = {"url": srv.url_for("/never"), "method": method, "parts": parts}
    fails(config, match, node_type="HTTP_MULTIPART")
    assert srv.log == []


def test_multipart_over_request_cap_fails_before_sending(srv: HTTPServer) -> None:
    policy = HttpPolicy(mode="allow-list", allow=("127.0.0.1",), max_request_bytes=1000)
    parts = [{"name": "f", "data_b64": b64(b"a" * 2000), "filename": "f"}]
    config = {"url": srv.url_for("/never"), "parts": parts}
    fails(config, "1000-byte request cap", node_type="HTTP_MULTIPART", policy=policy)
    # small data whose multipart framing pushes it over the cap
    parts = [{"name": "f", "data_b64": b64(b"a" * 990)}]
    config = {"url": srv.url_for("/never"), "parts": parts}
    fails(config, "1000-byte request cap", node_type="HTTP_MULTIPART", policy=policy)
    assert srv.log == []


# --------------------------------------------------------------------------- concurrency


def test_fifty_concurrent_slow_requests_overlap(slow: str) -> None:
    async def main() -> float:
        async with make_client(LOCAL) as client:
            started = time.monotonic()
            results = await asyncio.gather(
                *(
                    run_http(
                        client,
                        LOCAL,
                        "HTTP",
                        {"url": f"{slow}/sleep?s=1", "method": "GET", "timeout_seconds": 30},
                        f"k{i}",
                    )
                    for i in range(50)
                )
            )
            elapsed = time.monotonic() - started
        assert [r["status"] for r in results] == [200] * 50
        return elapsed

    elapsed = asyncio.run(main())
    print(f"50 concurrent 1 s requests took {elapsed:.2f} s")
    assert elapsed < 10


# --------------------------------------------------------------------------- policy: public


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.255", "carrier-grade NAT"),
        ("0.0.0.0", "this-network"),
        ("0.1.2.3", "this-network"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "unique-local"),
        ("fd00:ec2::254", "unique-local"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:169.254.169.254", "IPv4-mapped"),
        ("::ffff:10.0.0.1", "IPv4-mapped"),
        ("64:ff9b::a9fe:a9fe", "NAT64"),
        ("2002:7f00:1::1", "6to4 of a loopback address"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", "IPv4-mapped"),  # global unicast only (see test_http_hostile)
        ("2002:808:808::1", None),  # 6to4 of a public address
    ],
)
def test_blocked_reason(address: str, reason: str | None) -> None:
    assert blocked_reason(address) == reason


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:8080/x",
        "http://[::1]/",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://8.8.8.8/",
        "http://2130706433/",
        "http://127.1/",
        "http://0x7f.0.0.1/",
    ],
)
def test_public_rejects_bare_ips(url: str) -> None:
    with pytest.raises(HttpStepError, match="bare IP"):
        check(HttpPolicy(), url)


def test_public_blocks_localhost_after_resolving_it() -> None:
    with pytest.raises(HttpStepError, match="resolves to a blocked address") as info:
        check(HttpPolicy(), "http://localhost:8080/")
    assert "'localhost'" in str(info.value)
    assert "127.0.0.1" in str(info.value)


def test_public_blocks_a_real_local_server_by_name(srv: HTTPServer) -> None:
    url = srv.url_for("/x").replace("127.0.0.1", "localhost")
    fails({"url": url, "method": "GET"}, "resolves to a blocked address", policy=HttpPolicy())
    assert srv.log == []


def test_public_guard_also_blocks_at_connect_time(srv: HTTPServer) -> None:
    # Bypass check_url entirely: the client itself refuses to connect to loopback, which is
    # what defeats DNS rebinding between check_url's lookup and the connection.
    async def main() -> None:
        async with make_client(HttpPolicy()) as client:
            await client.get(srv.url_for("/x").replace("127.0.0.1", "localhost"))

    with pytest.raises(HttpStepError, match="resolves to a blocked address"):
        asyncio.run(main())
    assert srv.log == []


class _FakeDNSLoop(asyncio.SelectorEventLoop):
    """An event loop whose resolver answers from a table (the sandbox has no public DNS)."""

    answers: ClassVar[dict[str, list[str]]] = {}

    async def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port, 0, 0) if ":" in a else (a, port),
            )
            for a in self.answers[host]
        ]


@pytest.mark.parametrize(
    ("answers", "blocked"),
    [
        (["93.184.215.14"], None),
        (["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"], None),
        (["93.184.215.14", "10.0.0.5"], "10.0.0.5"),
        (["::ffff:169.254.169.254"], "::ffff:169.254.169.254"),
        (["100.64.1.1"], "100.64.1.1"),
    ],
)
def test_public_checks_every_dns_answer(answers: list[str], blocked: str | None) -> None:
    _FakeDNSLoop.answers = {"api.example.com": answers}
    with asyncio.Runner(loop_factory=_FakeDNSLoop) as runner:
        if blocked is None:
            runner.run(check_url(HttpPolicy(), "https://api.example.com/v1"))
        else:
            with pytest.raises(HttpStepError, match="resolves to a blocked address") as info:
                runner.run(check_url(HttpPolicy(), "https://api.example.com/v1"))
            assert blocked in str(info.value)
            assert "'api.example.com'" in str(info.value)


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/"])
@pytest.mark.parametrize("policy", [HttpPolicy(), LOCAL, HttpPolicy(mode="deny-all")])
def test_unsupported_scheme(url: str, policy: HttpPolicy) -> None:
    with pytest.raises(HttpStepError, match="unsupported URL scheme"):
        check(policy, url)


# --------------------------------------------------------------------------- policy: allow-list


def test_allow_list_with_port_admits_only_that_port(srv: HTTPServer) -> None:
    port = int(srv.url_for("/").split(":")[2].split("/")[0])
    policy = HttpPolicy(mode="allow-list", allow=(f"127.0.0.1:{port}",))
    srv.expect_request("/p").respond_with_data("ok")
    assert call({"url": srv.url_for("/p"), "method": "GET"}, policy=policy)["ok"]
    other = f"http://127.0.0.1:{closed_port()}/p"
    message = fails({"url": other}, "not in the allowed", policy=policy)
    assert "'127.0.0.1'" in message
    assert f"127.0.0.1:{port}" in message
    # the same server by another name is not admitted either
    fails(
        {"url": srv.url_for("/p").replace("127.0.0.1", "localhost")},
        "not in the allowed",
        policy=policy,
    )


def test_allow_list_may_name_localhost(srv: HTTPServer) -> None:
    policy = HttpPolicy.from_strings("allow-list", "localhost")
    srv.expect_request("/lh").respond_with_data("ok")
    url = srv.url_for("/lh").replace("127.0.0.1", "localhost")
    assert call({"url": url, "method": "GET"}, policy=policy)["ok"]


@pytest.mark.parametrize(
    ("patterns", "url", "admitted"),
    [
        (("api.example.com",), "https://api.example.com/x", True),
        (("api.example.com",), "http://API.Example.COM./x", True),
        (("api.example.com",), "https://api.example.com:8443/x", True),
        (("api.example.com",), "https://x.api.example.com/", False),
        (("api.example.com",), "https://api.example.com.evil.net/", False),
        (("api.example.com",), "https://api.example.com@evil.net/", False),
        (("*.example.com",), "https://a.example.com/", True),
        (("*.example.com",), "https://a.b.example.com/", True),
        (("*.example.com",), "https://example.com/", False),
        (("*.example.com",), "https://badexample.com/", False),
        (("*.example.com",), "https://example.com.evil.net/", False),
        (("api.example.com:443",), "https://api.example.com/", True),
        (("api.example.com:443",), "http://api.example.com/", False),
        (("api.example.com:443",), "https://api.example.com:8443/", False),
        (("*.example.com:8080",), "http://a.example.com:8080/", True),
        (("*.example.com:8080",), "http://a.example.com/", False),
        (("[::1]:8080",), "http://[::1]:8080/", True),
        (("::1",), "http://[::1]:9/", True),
        (("127.0.0.1",), "http://127.0.0.1:1234/", True),
        (("127.0.0.1",), "http://127.0.0.2/", False),
        (("a.com", "b.com"), "https://b.com/", True),
    ],
)
def test_allow_list_patterns(patterns: tuple[str, ...], url: str, admitted: bool) -> None:
    policy = HttpPolicy(mode="allow-list", allow=patterns)
    if admitted:
        check(policy, url)
    else:
        with pytest.raises(HttpStepError, match="not in the allowed"):
            check(policy, url)


# --------------------------------------------------------------------------- policy: deny-all


@pytest.mark.parametrize("url", ["https://api.example.com/", "http://127.0.0.1:1/"])
def test_deny_all_blocks_everything(url: str) -> None:
    with pytest.raises(HttpStepError, match="outbound HTTP requests are disabled"):
        check(HttpPolicy(mode="deny-all"), url)


def test_deny_all_blocks_before_sending(srv: HTTPServer) -> None:
    policy = HttpPolicy(mode="deny-all")
    fails({"url": srv.url_for("/x")}, "outbound HTTP requests are disabled", policy=policy)

    async def direct() -> None:
        async with make_client(policy) as client:
            await client.get(srv.url_for("/x"))

    with pytest.raises(HttpStepError, match="outbound HTTP requests are disabled"):
        asyncio.run(direct())
    assert srv.log == []


# --------------------------------------------------------------------------- policy config


def test_policy_defaults() -> None:
    policy = HttpPolicy()
    assert policy.mode == "public"
    assert policy.allow == ()
    assert policy.max_request_bytes == MAX_REQUEST_BYTES_DEFAULT == 10 * 1024 * 1024
    assert policy.max_response_bytes == MAX_RESPONSE_BYTES_DEFAULT == 10 * 1024 * 1024
    assert policy.max_timeout_seconds == MAX_TIMEOUT_SECONDS_DEFAULT == 300
    policy.validate()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "allow-all"}, "mode"),
        ({"mode": "allow-list"}, "allow"),
        ({"mode": "public", "allow": ("a.com",)}, "allow"),
        ({"mode": "allow-list", "allow": ("a b",)}, "allow pattern"),
        ({"mode": "allow-list", "allow": ("*.10.0.0.1",)}, "allow pattern"),
        ({"mode": "allow-list", "allow": ("a.com:99999",)}, "allow pattern"),
        ({"mode": "allow-list", "allow": ("http://a.com",)}, "allow pattern"),
        ({"mode": "allow-list", "allow": ("[::1",)}, "allow pattern"),
        ({"max_request_bytes": 0}, "max_request_bytes"),
        ({"max_response_bytes": -1}, "max_response_bytes"),
        ({"max_response_bytes": 1.5}, "max_response_bytes"),
        ({"max_timeout_seconds": 0}, "max_timeout_seconds"),
    ],
)
def test_policy_validate_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        HttpPolicy(**kwargs).validate()
    with pytest.raises(ConfigError, match=field):
        make_client(HttpPolicy(**kwargs))


def test_from_strings() -> None:
    policy = HttpPolicy.from_strings("Allow-List", "API.example.com, *.b.com:8443 127.0.0.1:80")
    assert policy.mode == "allow-list"
    assert policy.allow == ("api.example.com", "*.b.com:8443", "127.0.0.1:80")
    assert HttpPolicy.from_strings(None, ["a.com", "b.com,c.com"]).allow == (
        "a.com",
        "b.com",
        "c.com",
    )
    assert HttpPolicy.from_strings("", None) == HttpPolicy()
    assert HttpPolicy.from_strings("deny_all").mode == "deny-all"
    capped = HttpPolicy.from_strings("public", max_timeout_seconds=5, max_response_bytes=10)
    assert (capped.max_timeout_seconds, capped.max_response_bytes) == (5, 10)
    with pytest.raises(ConfigError, match="mode"):
        HttpPolicy.from_strings("everything")


def test_make_client_settings() -> None:
    async def main() -> None:
        async with make_client(HttpPolicy()) as client:
            assert client.follow_redirects is False
            assert client.trust_env is False
            assert client.headers["user-agent"] == f"pgdurable/{pgdurable.__version__}"

    asyncio.run(main())


def test_client_is_reusable_across_requests(srv: HTTPServer) -> None:
    srv.expect_request("/r").respond_with_data("ok")

    async def main() -> list[int]:
        async with make_client(LOCAL) as client:
            return [
                (await run_http(client, LOCAL, "HTTP", {"url": srv.url_for("/r")}, "k"))["status"]
                for _ in range(5)
            ]

    assert asyncio.run(main()) == [200] * 5
