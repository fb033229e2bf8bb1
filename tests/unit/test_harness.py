"""pgdurable.harness's own parts that need no database: the DSN helper and the loopback HTTP
recorder (recording, a soft cut answering 503, a hard cut refusing connections, then back on
the same port). Serve is exercised by every acceptance test through serve_factory."""

from __future__ import annotations

import http.client
import threading
import time

import psycopg
import pytest

from pgdurable.harness import HttpRecorder, dsn_with


def test_dsn_with_replaces_only_what_it_is_given() -> None:
    base = "host=127.0.0.1 port=5432 dbname=postgres user=postgres sslmode=disable"
    got = psycopg.conninfo.conninfo_to_dict(dsn_with(base, dbname="d1", user="alice"))
    assert got == {
        "host": "127.0.0.1",
        "port": "5432",
        "dbname": "d1",
        "user": "alice",
        "sslmode": "disable",
    }
    only_db = psycopg.conninfo.conninfo_to_dict(dsn_with(base, dbname="d2"))
    assert (only_db["dbname"], only_db["user"]) == ("d2", "postgres")
    url = psycopg.conninfo.conninfo_to_dict(dsn_with("postgresql://u@h:1/x", user="v"))
    assert url == {"host": "h", "port": "1", "dbname": "x", "user": "v"}


def post(rec: HttpRecorder, path: str, body: bytes, key: str | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", rec.port, timeout=5)
    try:
        conn.request("POST", path, body, {"Idempotency-Key": key} if key else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_recorder_records_and_answers() -> None:
    with HttpRecorder() as rec:
        assert post(rec, "/a/1", b"hello", "k1") == (200, b'{"ok": true}')
        assert post(rec, "/b/2", b"", None)[0] == 200
        assert [(r.method, r.path, r.body, r.idempotency_key) for r in rec.requests] == [
            ("POST", "/a/1", b"hello", "k1"),
            ("POST", "/b/2", b"", None),
        ]
        assert [r.path for r in rec.hits("/a/")] == ["/a/1"]
        rec.clear()
        assert rec.requests == []


def test_recorder_cuts_soft_and_hard_and_comes_back() -> None:
    with HttpRecorder() as rec:
        port = rec.port
        soft = threading.Thread(target=rec.cut, args=(0.6, False))
        soft.start()
        time.sleep(0.2)
        assert post(rec, "/x", b"", "k")[0] == 503
        soft.join()
        assert post(rec, "/x", b"", "k")[0] == 200
        hard = threading.Thread(target=rec.cut, args=(1.5, True))
        hard.start()
        deadline = time.monotonic() + 1
        while rec.srv is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # shutdown() waits for serve_forever's poll (<= 0.5 s)
        with pytest.raises(ConnectionRefusedError):
            post(rec, "/x", b"", "k")
        hard.join()
        assert rec.port == port
        assert post(rec, "/x", b"", "k")[0] == 200
        assert len(rec.requests) == 3  # the refused one never arrived


def test_recorder_without_a_log() -> None:
    with HttpRecorder(record=False) as rec:
        assert post(rec, "/ok", b"", None)[0] == 200
        assert rec.requests == []
