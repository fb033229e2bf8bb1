"""End-to-end HTTP steps: `pgdurable serve` calls a real HTTP server on 127.0.0.1.

One threaded stdlib server per module records every request it receives (method, path,
headers, body) and answers by path. Most tests share one database and one `serve` per
PostgreSQL server (module scope, allow-list `127.0.0.1,localhost`); the policy tests start
their own `serve` with another egress policy.
"""

from __future__ import annotations

import base64
import contextlib
import email.parser
import functools
import gzip
import json
import os
import signal
import socket
import textwrap
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from pgdurable.harness import HttpRecorder, Reply, Request
from tests import fix_db
from tests.acceptance.conftest import Env, Serve, module_env
from tests.fix_db import Server

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


# --------------------------------------------------------------------------- HTTP server


Seen = Request  # what the recorder read: method, path, headers, body, at


class Recorder(HttpRecorder):
    """The shared loopback recorder, answering by path (``/echo``, ``/status/<code>``, …) over
    HTTP/1.0 (one request per connection: ``/huge`` promises more than it sends and closes)."""

    def __init__(self) -> None:
        self.slow_once: set[str] = set()
        super().__init__(protocol="HTTP/1.0")

    @property
    def base(self) -> str:
        return self.url

    def answer(self, h: BaseHTTPRequestHandler, req: Request) -> Reply | None:
        path = req.path
        parts = path.split("?")[0].strip("/").split("/")
        kind = parts[0]
        if kind == "echo":
            return Reply(
                200,
                json.dumps({"method": req.method, "path": path}).encode(),
                "application/json",
                [("X-Multi", "a"), ("X-Multi", "b"), ("X-One", "1")],
            )
        if kind == "text":
            return Reply(200, "héllo wörld".encode("latin-1"), "text/plain; charset=latin-1")
        if kind == "bin":
            return Reply(200, b"\x00\x01\xfe\xffpng", "application/octet-stream")
        if kind == "noctype":
            return Reply(200, b"plain utf-8 \xe2\x9c\x93", None)
        if kind == "status":
            code = int(parts[1])
            return Reply(code, f"status {code} body".encode(), "text/plain")
        if kind == "redirect":
            return Reply(302, b"", None, [("Location", "/echo/redirected")])
        if kind == "sleep":
            # the server-side delay the timeout / concurrency tests measure against
            self.stopping.wait(float(parts[1]))
            return Reply(200, b"slept", "text/plain")
        if kind == "huge":
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(10 * MiB + 1))
            h.end_headers()
            with contextlib.suppress(OSError):
                h.wfile.write(b"x" * 1024)
            return None
        if kind == "setcookie":  # /setcookie/<name>/<value>
            return Reply(
                200, b"cookie set", "text/plain", [("Set-Cookie", f"{parts[1]}={parts[2]}; Path=/")]
            )
        if kind == "headers":  # what the server received, for the step's result
            return Reply(200, json.dumps(req.headers).encode(), "application/json")
        if kind == "bomb":  # /bomb/<Content-Encoding>
            coding = parts[1]
            body = gzip_gzip_bomb() if coding == "gzip,gzip" else gzip_bomb()
            return Reply(
                200,
                body,
                "application/octet-stream",
                [("Content-Encoding", coding.replace(",", ", "))],
            )
        if kind == "gzip-ok":
            return Reply(
                200, gzip.compress(b"fine " * 200_000), "text/plain", [("Content-Encoding", "gzip")]
            )
        if kind == "slow-once":
            tag = parts[1]
            with self.lock:
                first = tag not in self.slow_once
                self.slow_once.add(tag)
            if first:
                # hold the first attempt until its worker is killed (test ends it)
                self.stopping.wait(60)
            return Reply(200, b"second attempt", "text/plain")
        return Reply(404, b"no such path", "text/plain")


@pytest.fixture
def http(_http: Recorder) -> Recorder:
    """The module's server with its request log emptied for this test."""
    _http.clear()
    return _http


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    with Recorder() as rec:
        yield rec


@pytest.fixture(scope="module")
def _http() -> Iterator[Recorder]:
    with recording() as rec:
        yield rec


def gzip_zeros(n: int) -> bytes:
    """gzip of ``n`` zero bytes, made in 1 MiB steps."""
    z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(MiB)
    return b"".join([*(z.compress(zeros) for _ in range(n // MiB)), z.flush()])


@functools.cache
def gzip_bomb() -> bytes:
    """One gzip layer: about 1 MB that inflates to 1 GiB."""
    return gzip_zeros(1024 * MiB)


@functools.cache
def gzip_gzip_bomb() -> bytes:
    """Two layers (``Content-Encoding: gzip, gzip``): 1,827 bytes that inflate to 1 GiB."""
    return gzip.compress(gzip_bomb(), 9)


# --------------------------------------------------------------------------- database + serve


def serve_env(**kw: str) -> dict[str, str]:
    """Serve settings under both spellings: the documented ``PGDURABLE_X`` and click's
    ``PGDURABLE_SERVE_X`` (what the CLI actually reads today, see the report)."""
    out: dict[str, str] = {}
    for k, v in kw.items():
        out[f"PGDURABLE_{k.upper()}"] = v
        out[f"PGDURABLE_SERVE_{k.upper()}"] = v
    return out


BASE_ENV = serve_env(
    http_policy="allow-list", http_allow="127.0.0.1,localhost", lease_seconds="5", workers="2"
)


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One database + one serve (allow-list 127.0.0.1, localhost) for this module."""
    with module_env(
        server,
        tmp_path_factory.mktemp("serve"),
        BASE_ENV,
        lambda db: db.create_role("web", http=True),
    ) as e:
        yield e


def start(
    db: fix_db.TestDB,
    role: str,
    expr: str,
    params: tuple[Any, ...] = (),
    label: str | None = None,
    setvars: dict[str, str] | None = None,
) -> str:
    with db.connect(role) as conn:
        for k, v in (setvars or {}).items():
            conn.execute("select df.setvar(%s, %s)", (k, v))
        return str(conn.execute(f"select df.start({expr}, %s)", (*params, label)).fetchone()[0])


def finish(db: fix_db.TestDB, role: str, iid: str, timeout: int = 60) -> tuple[str, Any, Any]:
    with db.connect(role) as conn:
        status = conn.execute("select df.await_instance(%s, %s)", (iid, timeout)).fetchone()[0]
        result = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]
        error = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
    return status, (json.loads(result) if result else None), error


def run(
    db: fix_db.TestDB, role: str, expr: str, params: tuple[Any, ...] = (), **kw: Any
) -> tuple[str, str, Any, Any]:
    iid = start(db, role, expr, params, **kw)
    return (iid, *finish(db, role, iid))


def node_id(db: fix_db.TestDB, iid: str, node_type: str) -> str:
    with db.connect() as conn:
        return str(
            conn.execute(
                "select id from df.nodes where instance_id = %s and node_type = %s",
                (iid, node_type),
            ).fetchone()[0]
        )


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    return int(port)


# --------------------------------------------------------------------------- envelope


def test_envelope_text_base64_headers_and_statuses(env: Env, http: Recorder) -> None:
    """Every envelope field; text vs base64 bodies; 4xx/3xx ok:false; 5xx fails."""
    b = http.base
    cases = {
        "json": ("df.http(%s, 'GET')", f"{b}/echo/json"),
        "text": ("df.http(%s, 'GET')", f"{b}/text"),
        "bin": ("df.http(%s, 'GET')", f"{b}/bin"),
        "noctype": ("df.http(%s, 'GET')", f"{b}/noctype"),
        "404": ("df.http(%s, 'DELETE')", f"{b}/status/404"),
        "302": ("df.http(%s, 'GET')", f"{b}/redirect"),
        "503": ("df.http(%s, 'GET')", f"{b}/status/503"),
    }
    ids = {k: start(env.db, env.role, expr, (url,)) for k, (expr, url) in cases.items()}
    out = {k: finish(env.db, env.role, iid) for k, iid in ids.items()}

    status, res, err = out["json"]
    assert status == "completed", err
    assert set(res) == {"status", "body", "encoding", "headers", "ok", "duration_ms"}
    assert res["status"] == 200
    assert res["ok"] is True
    assert res["encoding"] == "text"
    assert json.loads(res["body"]) == {"method": "GET", "path": "/echo/json"}
    assert res["headers"]["content-type"] == "application/json"
    assert res["headers"]["x-multi"] == "a, b"  # repeated headers joined, names lower-case
    assert isinstance(res["duration_ms"], int)
    assert res["duration_ms"] >= 0

    status, res, err = out["text"]
    assert status == "completed", err
    assert (res["body"], res["encoding"]) == ("héllo wörld", "text")  # charset honoured

    status, res, err = out["bin"]
    assert status == "completed", err
    assert res["encoding"] == "base64"
    assert base64.b64decode(res["body"]) == b"\x00\x01\xfe\xffpng"

    status, res, err = out["noctype"]
    assert status == "completed", err
    assert (res["body"], res["encoding"]) == ("plain utf-8 ✓", "text")

    status, res, err = out["404"]
    assert status == "completed", err  # 4xx: the node succeeds with ok:false
    assert (res["status"], res["ok"], res["body"]) == (404, False, "status 404 body")
    assert http.hits("/status/404")[-1].method == "DELETE"

    status, res, err = out["302"]
    assert status == "completed", err  # 3xx: not followed, ok:false
    assert (res["status"], res["ok"]) == (302, False)
    assert res["headers"]["location"] == "/echo/redirected"
    assert http.hits("/echo/redirected") == []

    status, res, err = out["503"]
    assert status == "failed"
    assert res is None
    assert err["node_type"] == "HTTP"
    assert "503" in err["error"]
    assert "status 503 body" in err["error"]


def test_timeout_refused_and_caps(env: Env, http: Recorder) -> None:
    b = http.base
    ids = {
        "timeout": start(
            env.db, env.role, "df.http(%s, 'GET', timeout_seconds => 1)", (f"{b}/sleep/5",)
        ),
        "refused": start(
            env.db, env.role, "df.http(%s, 'GET')", (f"http://127.0.0.1:{refused_port()}/x",)
        ),
        "huge": start(env.db, env.role, "df.http(%s, 'GET')", (f"{b}/huge",)),
        # two 5.5 MiB results substituted into one body: over the 10 MiB request cap
        "bigreq": start(
            env.db,
            env.role,
            "df.sql('select repeat(''x'', 5767168) as v') |=> 'a' ~> "
            "df.sql('select repeat(''y'', 5767168) as v') |=> 'b' ~> "
            "df.http(%s, 'POST', '$a.v $b.v')",
            (f"{b}/echo/bigreq",),
        ),
        "scheme": start(env.db, env.role, "df.http(%s, 'GET')", ("ftp://127.0.0.1/{x}",)),
    }
    t0 = time.monotonic()
    out = {k: finish(env.db, env.role, iid) for k, iid in ids.items()}
    for k, (status, _, err) in out.items():
        assert status == "failed", (k, err)
    assert "timed out after 1s" in out["timeout"][2]["error"]
    assert time.monotonic() - t0 < 15
    assert "could not connect" in out["refused"][2]["error"]
    assert "response cap" in out["huge"][2]["error"]
    assert "request cap" in out["bigreq"][2]["error"]
    assert http.hits("/echo/bigreq") == []
    assert "unsupported URL scheme" in out["scheme"][2]["error"]


# --------------------------------------------------------------------------- substitution


def test_substitution_headers_body_and_idempotency_key(env: Env, http: Recorder) -> None:
    b = http.base
    expr = (
        "df.sql('select 42 as n, ''abc'' as s') |=> 'r' ~> "
        "df.http(%s, 'PUT', %s, %s::jsonb) |=> 'h' ~> "
        "df.sql('select $h.status as st, $h.ok as ok, $h.encoding as enc')"
    )
    headers = {
        "X-Label": "{sys_label}",
        "X-N": "$r.n",
        "X-Var": "{v}",
        "X-Num": 5,
        "User-Agent": "spoofed",
        "Idempotency-Key": "spoofed",
    }
    iid, status, res, err = run(
        env.db,
        env.role,
        expr,
        (
            b + "/echo/sub/{sys_instance_id}?v={v}&s=$r.s",
            '{"n": $r.n, "s": "$r.s", "k": "{v}"}',
            json.dumps(headers),
        ),
        label="lbl-1",
        setvars={"v": "hello"},
    )
    assert status == "completed", err
    assert res["rows"] == [{"st": 200, "ok": True, "enc": "text"}]
    (hit,) = http.hits(f"/echo/sub/{iid}")
    assert hit.path == f"/echo/sub/{iid}?v=hello&s=abc"
    assert hit.method == "PUT"
    assert json.loads(hit.body) == {"n": 42, "s": "abc", "k": "hello"}
    h = {k.lower(): v for k, v in hit.headers.items()}
    assert h["x-label"] == "lbl-1"
    assert h["x-n"] == "42"
    assert h["x-var"] == "hello"
    assert "x-num" not in h  # non-string header values are dropped
    assert h["user-agent"].startswith("pgdurable/")
    assert h["idempotency-key"] == f"pgdurable-{iid}-{node_id(env.db, iid, 'HTTP')}"
    assert "content-type" not in h  # no default Content-Type for a verbatim body


def test_defaults_post_no_body(env: Env, http: Recorder) -> None:
    _iid, status, _res, err = run(env.db, env.role, "df.http(%s)", (f"{http.base}/echo/dflt",))
    assert status == "completed", err
    (hit,) = http.hits("/echo/dflt")
    assert hit.method == "POST"
    assert hit.body == b""


# --------------------------------------------------------------------------- multipart


def _parts(hit: Seen) -> list[tuple[str | None, str | None, str, bytes]]:
    ctype = {k.lower(): v for k, v in hit.headers.items()}["content-type"]
    msg = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + hit.body
    )
    assert msg.is_multipart()
    return [
        (
            p.get_param("name", header="content-disposition"),
            p.get_filename(),
            p.get_content_type(),
            p.get_payload(decode=True),
        )
        for p in msg.get_payload()
    ]


def test_multipart_as_received(env: Env, http: Recorder) -> None:
    blob = bytes(range(256))
    parts = [
        {
            "name": "meta",
            "data_b64": base64.b64encode(b'{"a": 1}').decode(),
            "content_type": "application/json",
        },
        {"name": "file", "filename": "blob.bin", "data_b64": base64.encodebytes(blob).decode()},
        {"name": "{v}_field", "filename": "{sys_instance_id}-$r.s.txt", "data_b64": "$r.b64"},
        {"name": "plain", "data_b64": "{b64var}"},
    ]
    expr = (
        "df.sql('select ''abc'' as s, encode(''hello''::bytea, ''base64'') as b64') |=> 'r'"
        " ~> df.http_multipart(%s, 'PUT', %s::jsonb, %s::jsonb)"
    )
    iid, status, res, err = run(
        env.db,
        env.role,
        expr,
        (
            http.base + "/echo/mp/{v}",
            json.dumps(parts),
            json.dumps({"Content-Type": "text/plain", "X-Tag": "{v}-$r.s"}),
        ),
        setvars={"v": "vv", "b64var": base64.b64encode(b"from var").decode()},
    )
    assert status == "completed", err
    assert res["ok"] is True
    (hit,) = http.hits("/echo/mp/vv")
    h = {k.lower(): v for k, v in hit.headers.items()}
    assert hit.method == "PUT"
    assert h["content-type"].startswith("multipart/form-data; boundary=")  # caller's ignored
    assert h["x-tag"] == "vv-abc"
    assert h["idempotency-key"] == f"pgdurable-{iid}-{node_id(env.db, iid, 'HTTP_MULTIPART')}"
    got = _parts(hit)
    assert got[0] == ("meta", None, "application/json", b'{"a": 1}')
    assert got[1] == ("file", "blob.bin", "application/octet-stream", blob)
    assert got[2][:2] == ("vv_field", f"{iid}-abc.txt")
    assert got[2][3] == b"hello"
    assert got[3][0] == "plain"
    assert got[3][3] == b"from var"


def test_multipart_data_b64_only_whole_value(env: Env, http: Recorder) -> None:
    parts = [{"name": "f", "data_b64": "aGk= $r.b64"}]
    _, status, _, err = run(
        env.db,
        env.role,
        "df.sql('select ''aGk='' as b64') |=> 'r' ~> df.http_multipart(%s, 'POST', %s::jsonb)",
        (f"{http.base}/echo/mpbad", json.dumps(parts)),
    )
    assert status == "failed"
    assert "whole-value reference" in err["error"]
    assert http.hits("/echo/mpbad") == []


# --------------------------------------------------------------------------- concurrency


def test_join_of_50_http_calls_runs_concurrently(env: Env, http: Recorder) -> None:
    def tree(lo: int, hi: int) -> str:
        if hi - lo == 1:
            return f"df.http('{http.base}/sleep/1?i={lo}', 'GET')"
        mid = (lo + hi) // 2
        return f"df.join({tree(lo, mid)}, {tree(mid, hi)})"

    t0 = time.monotonic()
    _iid, status, _res, err = run(env.db, env.role, tree(0, 50))
    elapsed = time.monotonic() - t0
    assert status == "completed", err
    hits = http.hits("/sleep/1?")
    keys = [{k.lower(): v for k, v in h.headers.items()}["idempotency-key"] for h in hits]
    dups = [
        (h.path, k, round(h.at - hits[0].at, 3))
        for h, k in zip(hits, keys, strict=True)
        if keys.count(k) > 1
    ]
    # every branch ran; a branch may occasionally run twice (a spurious fence after
    # checkpoint contention re-runs it, same Idempotency-Key: at-least-once, see docs/http.md)
    assert len({h.path for h in hits}) == 50, (dups, env.serve.log())
    if dups:
        print(f"re-run branches (same key): {dups}")
    spread = max(h.at for h in hits) - min(h.at for h in hits)
    print(f"JOIN of 50 x 1 s HTTP calls: {elapsed:.2f} s wall, requests spread {spread:.2f} s")
    # serial would be 50 s; 2 workers x 16 slots run them in two waves (~2-3 s), plus a
    # lease-bound re-run when a branch is spuriously fenced (see the report / docs)
    assert elapsed < 15, f"JOIN of 50 took {elapsed:.1f} s"


# --------------------------------------------------------------------------- privilege


def test_execute_privilege_is_rechecked_at_run_time(env: Env, http: Recorder) -> None:
    db = env.db
    # a role that never had EXECUTE on df.http: it submits the graph as a JSON literal
    nohttp = db.create_role("nohttp")
    with db.connect() as conn:
        graph = conn.execute("select df.http(%s, 'GET')", (f"{http.base}/echo/priv1",)).fetchone()[
            0
        ]
        mp = conn.execute(
            'select df.http_multipart(%s, \'POST\', \'[{"name":"a","data_b64":"aGk="}]\')',
            (f"{http.base}/echo/priv1mp",),
        ).fetchone()[0]
    _, status, _, err = run(db, nohttp, "%s", (graph,))
    assert status == "failed"
    assert "does not have EXECUTE privilege" in err["error"]
    _, status, _, err = run(db, nohttp, "%s", (mp,))
    assert status == "failed"
    assert "does not have EXECUTE privilege" in err["error"]
    # a role whose grant is revoked after df.start, before the step runs
    late = db.create_role("late", http=True)
    iid = start(
        db, late, "df.wait_for_signal('go') ~> df.http(%s, 'GET')", (f"{http.base}/echo/priv2",)
    )
    with db.connect() as conn:
        conn.execute(
            f'revoke execute on function df.http(text,text,text,jsonb,integer) from "{late}"'
        )
    with db.connect(late) as conn:
        conn.execute("select df.signal(%s, 'go')", (iid,))
    status, _, err = finish(db, late, iid)
    assert status == "failed"
    assert "does not have EXECUTE privilege" in err["error"]
    assert http.hits("/echo/priv") == []


# --------------------------------------------------------------------------- idempotency


def test_same_idempotency_key_when_the_step_reruns_after_a_worker_kill(
    env: Env, http: Recorder
) -> None:
    tag = uuid.uuid4().hex[:8]
    iid = start(env.db, env.role, "df.http(%s, 'GET')", (f"{http.base}/slow-once/{tag}",))
    deadline = time.monotonic() + 30
    while not http.hits(f"/slow-once/{tag}"):
        assert time.monotonic() < deadline, env.serve.log()
        time.sleep(0.05)
    for pid in env.serve.workers():  # whichever worker holds the request dies
        os.kill(pid, signal.SIGKILL)
    # re-run after the 5 s lease expires and the rescuer frees the step
    status, res, err = finish(env.db, env.role, iid, timeout=60)
    assert status == "completed", err
    assert res["body"] == "second attempt"
    hits = http.hits(f"/slow-once/{tag}")
    assert len(hits) == 2
    keys = {{k.lower(): v for k, v in h.headers.items()}["idempotency-key"] for h in hits}
    assert keys == {f"pgdurable-{iid}-{node_id(env.db, iid, 'HTTP')}"}
    env.serve.wait_workers(2)


# --------------------------------------------------------------------------- policy via serve


def _policy_run(
    db: fix_db.TestDB, serve_factory: Any, env_vars: dict[str, str], urls: dict[str, str]
) -> dict[str, tuple[str, Any, Any]]:
    role = db.create_role("pol", http=True)
    s = serve_factory(db, **env_vars)
    ids = {k: start(db, role, "df.http(%s, 'GET')", (u,)) for k, u in urls.items()}
    out = {k: finish(db, role, iid, timeout=60) for k, iid in ids.items()}
    s.stop()
    return out


def test_public_policy_blocks_loopback(
    db: fix_db.TestDB, serve_factory: Any, http: Recorder
) -> None:
    out = _policy_run(
        db,
        serve_factory,
        {**BASE_ENV, **serve_env(http_policy="public", http_allow="")},
        {"ip": f"{http.base}/echo/pub-ip", "name": f"http://localhost:{http.port}/echo/pub-name"},
    )
    assert out["ip"][0] == "failed"
    assert "bare IP" in out["ip"][2]["error"]
    assert out["name"][0] == "failed"
    assert "resolves to a blocked address" in out["name"][2]["error"]
    assert http.hits("/echo/pub-") == []


def test_allow_list_admits_only_its_patterns(
    db: fix_db.TestDB, serve_factory: Any, http: Recorder
) -> None:
    out = _policy_run(
        db,
        serve_factory,
        {
            **BASE_ENV,
            **serve_env(
                http_policy="allow-list", http_allow=f"127.0.0.1:{http.port},*.example.com"
            ),
        },
        {
            "ok": f"{http.base}/echo/al-ok",
            "port": f"http://127.0.0.1:{refused_port()}/echo/al-port",
            "name": f"http://localhost:{http.port}/echo/al-name",
        },
    )
    assert out["ok"][0] == "completed", out["ok"][2]
    assert out["port"][0] == "failed"
    assert "not in the allowed" in out["port"][2]["error"]
    assert out["name"][0] == "failed"
    assert "not in the allowed" in out["name"][2]["error"]
    assert len(http.hits("/echo/al-")) == 1


def test_deny_all(db: fix_db.TestDB, serve_factory: Any, http: Recorder) -> None:
    out = _policy_run(
        db,
        serve_factory,
        {**BASE_ENV, **serve_env(http_policy="deny-all", http_allow="")},
        {"x": f"{http.base}/echo/deny"},
    )
    assert out["x"][0] == "failed"
    assert "outbound HTTP requests are disabled" in out["x"][2]["error"]
    assert http.hits("/echo/deny") == []


# --------------------------------------------------------------------------- hostile world


ONE_WORKER = {**BASE_ENV, **serve_env(workers="1")}


def run_logged(
    serve: Serve, db: fix_db.TestDB, role: str, expr: str, params: tuple[Any, ...] = ()
) -> tuple[str, str, Any, Any]:
    """:func:`run`, with serve's log in the failure if the instance never finishes."""
    try:
        return run(db, role, expr, params)
    except psycopg.Error as exc:
        raise AssertionError(f"{exc}\n--- serve log ---\n{serve.log()}") from exc


def test_tenants_share_no_cookies(db: fix_db.TestDB, serve_factory: Any, http: Recorder) -> None:
    """One worker runs both tenants' steps with its one client: B's session cookie never
    reaches A's request (nor A's df.result), and a cookie A's own server plants (another
    port; cookies ignore ports) never reaches B."""
    tenant_a = db.create_role("tenant_a", http=True)
    tenant_b = db.create_role("tenant_b", http=True)
    serve = serve_factory(db, **ONE_WORKER)
    serve.wait_workers(1)
    with recording() as a_site:
        steps = [
            (tenant_b, f"{http.base}/setcookie/session/b-secret"),
            (tenant_a, f"{http.base}/headers/a"),
            (tenant_a, f"{a_site.base}/setcookie/planted/a-evil"),
            (tenant_b, f"{http.base}/headers/b"),
            (tenant_b, f"http://localhost:{http.port}/headers/b-by-name"),
        ]
        results = []
        for role, url in steps:  # one after another: each step sees what came before
            _, status, res, err = run_logged(serve, db, role, "df.http(%s, 'GET')", (url,))
            assert status == "completed", err
            results.append(res)
        assert a_site.hits("/setcookie/")[0].headers.get("Cookie") is None
    assert results[0]["headers"]["set-cookie"] == "session=b-secret; Path=/"  # B's own
    assert results[2]["headers"]["set-cookie"] == "planted=a-evil; Path=/"
    assert [h.headers.get("Cookie") for h in http.hits("/")] == [None] * 4
    a_saw = json.loads(results[1]["body"])
    assert "Cookie" not in a_saw
    assert "b-secret" not in json.dumps(results[1])
    assert "a-evil" not in json.dumps(results[3]) + json.dumps(results[4])
    # a workflow that wants its session passes the cookie on itself (docs/http.md)
    _, status, _, err = run_logged(
        serve,
        db,
        tenant_a,
        "df.http(%s, 'GET') |=> 'login' ~> "
        "df.sql($q$select split_part(($login.headers)::jsonb ->> 'set-cookie', ';', 1) as c$q$)"
        " |=> 'ck' ~> df.http(%s, 'GET', null, '{\"Cookie\": \"$ck.c\"}')",
        (f"{http.base}/setcookie/mine/a-own", f"{http.base}/headers/a-explicit"),
    )
    assert status == "completed", err
    assert http.hits("/headers/a-explicit")[0].headers.get("Cookie") == "mine=a-own"
    assert len(serve.workers()) == 1


class RssSampler:
    """Peak resident memory of a set of processes, sampled every 5 ms in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = 0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                total = max(total, proc.memory_info().rss)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_decompression_bombs_fail_and_worker_rss_stays_bounded(
    db: fix_db.TestDB, serve_factory: Any, http: Recorder
) -> None:
    """A 1,827-byte ``gzip, gzip`` response (1 GiB inside) and a 1 MB single-layer gzip bomb
    fail their step naming the cap; the worker's RSS stays under 150 MB throughout."""
    bombs = {"gzip,gzip": gzip_gzip_bomb(), "gzip": gzip_bomb()}  # made before serve runs
    assert len(bombs["gzip,gzip"]) < 2048
    role = db.create_role("bomb", http=True)
    serve = serve_factory(db, **ONE_WORKER)
    (worker,) = serve.wait_workers(1)
    # warm up: the worker's client and a real (small) gzip response decode fine
    _, status, res, err = run_logged(
        serve, db, role, "df.http(%s, 'GET')", (f"{http.base}/gzip-ok",)
    )
    assert status == "completed", err
    assert res["body"] == "fine " * 200_000
    # the same worker still runs (seen once in CI: gone here, cause unknown); say what its
    # serve logged when it is not
    assert worker in serve.workers(), f"worker {worker} is gone:\n{serve.log()}"
    with RssSampler([worker]) as rss:
        before = rss.rss()
        out = {
            coding: run_logged(
                serve, db, role, "df.http(%s, 'GET')", (f"{http.base}/bomb/{coding}",)
            )
            for coding in bombs
        }
        time.sleep(0.2)
        after = rss.rss()
    print(
        f"worker RSS: {before / MiB:.1f} MiB before the bombs, peak {rss.peak / MiB:.1f} MiB,"
        f" {after / MiB:.1f} MiB after"
    )
    assert rss.peak < 150 * MiB, f"worker RSS peaked at {rss.peak / MiB:.0f} MiB"
    _, status, _, err = out["gzip,gzip"]
    assert status == "failed"
    assert "2 Content-Encoding layers ('gzip, gzip')" in err["error"]
    assert f"{10 * MiB}-byte response cap" in err["error"]
    _, status, _, err = out["gzip"]
    assert status == "failed"
    assert f"decodes (gzip) to more than the {10 * MiB}-byte response cap" in err["error"]
    assert serve.workers() == [worker]  # the worker survived


# A test-only resolver for serve's workers: the names below answer from this table. Loaded as
# sitecustomize (PYTHONPATH) in serve's processes; it wraps uvloop's loop, whose getaddrinfo
# is what the HTTP policy and anyio resolve with. /etc/hosts is not touched.
_DNS_OVERRIDE = textwrap.dedent("""
    import json, os, socket

    _ANSWERS = json.loads(os.environ.get("PGDURABLE_TEST_DNS", "{}"))

    def _override(base):
        class Loop(base):
            async def getaddrinfo(self, host, port, *args, **kwargs):
                name = host.decode("ascii") if isinstance(host, bytes) else host
                if name not in _ANSWERS:
                    return await super().getaddrinfo(host, port, *args, **kwargs)
                port = int(port or 0)
                return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0))
                        if ":" in a else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                        for a in _ANSWERS[name]]
        return Loop

    if _ANSWERS:
        import uvloop
        uvloop.Loop = _override(uvloop.Loop)
""")

V6_FORMS = {  # name -> (its only DNS answer, the reason the public policy gives)
    "nat64-local.pgdurable.test": ("64:ff9b:1::7f00:1", "local-use NAT64"),
    "translated.pgdurable.test": ("::ffff:0:7f00:1", "IPv4-translated"),
    "compat.pgdurable.test": ("::7f00:1", "IPv4-compatible"),
    "site-local.pgdurable.test": ("fec0::1", "site-local"),
    "mapped.pgdurable.test": ("::ffff:127.0.0.1", "IPv4-mapped"),
    "nat64.pgdurable.test": ("64:ff9b::7f00:1", "NAT64"),
}


def test_public_policy_blocks_ipv6_forms_of_internal_addresses(
    db: fix_db.TestDB, serve_factory: Any, http: Recorder, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(_DNS_OVERRIDE)
    dns = {
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p
        ),
        "PGDURABLE_TEST_DNS": json.dumps({name: [a] for name, (a, _) in V6_FORMS.items()}),
    }
    # control: the override is live in serve's workers, and ::ffff:127.0.0.1 really is a way
    # to this 127.0.0.1 server (an allow-list that names it reaches it)
    control = _policy_run(
        db,
        serve_factory,
        {**BASE_ENV, **dns, **serve_env(http_allow="*.pgdurable.test")},
        {"mapped": f"http://mapped.pgdurable.test:{http.port}/echo/v6-ok"},
    )
    assert control["mapped"][0] == "completed", control["mapped"][2]
    assert len(http.hits("/echo/v6-ok")) == 1
    out = _policy_run(
        db,
        serve_factory,
        {**BASE_ENV, **dns, **serve_env(http_policy="public", http_allow="")},
        {name: f"http://{name}:{http.port}/echo/v6-{name}" for name in V6_FORMS},
    )
    for name, (address, reason) in V6_FORMS.items():
        status, _, err = out[name]
        assert status == "failed", (name, err)
        assert f"resolves to a blocked address {address} ({reason})" in err["error"], err
    assert http.hits("/echo/v6-") == http.hits("/echo/v6-ok")  # nothing else got through
