"""One sanitiser (pgdurable/sanitize.py) for tenants' text on a terminal or in a log line, and
its SQL twin df._visible (behind df.explain's text): the same convention, character for
character, on every server."""

from __future__ import annotations

import json

import pytest

from pgdurable import diagram
from pgdurable.sanitize import UNSAFE, for_log, mask_userinfo, visible, visible_lines
from pgdurable.top import TopState, render

ESC = "\x1b"
# what a hostile label carries: a fake row, an erase-line, a window title, a clipboard write
HOSTILE = (
    "ok\n2026-01-01 00:00:00  completed  fake"
    + ESC
    + "[2K"
    + ESC
    + "]0;owned"
    + "\x07"
    + ESC
    + "]52;c;aGVsbG8="
    + "\x07"
)

# every character the convention escapes, and how
ESCAPED = {
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\x00": "\\u0000",
    "\x07": "\\u0007",
    ESC: "\\u001b",
    "\x1f": "\\u001f",
    "\x7f": "\\u007f",
    "\x80": "\\u0080",
    "\x85": "\\u0085",
    "\x9b": "\\u009b",
    "\x9d": "\\u009d",
    "\x9f": "\\u009f",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
    "\u202a": "\\u202a",
    "\u202b": "\\u202b",
    "\u202c": "\\u202c",
    "\u202d": "\\u202d",
    "\u202e": "\\u202e",
    "\u2066": "\\u2066",
    "\u2067": "\\u2067",
    "\u2068": "\\u2068",
    "\u2069": "\\u2069",
}
# kept as they are: ordinary Unicode and the backslash
KEPT = (
    "select 'é' as café, '日本語' as ja, 'שלום' as he, '🙂' as e, "
    "E'a\\\\nb' as literal_backslash_n, '\u00a0nbsp' as n, '~' as tilde, '{\"a\": 1}'"
)


def test_each_unsafe_character_has_its_escape():
    for ch, shown in ESCAPED.items():
        assert visible(f"a{ch}b") == f"a{shown}b", repr(ch)


def test_every_c0_c1_and_del_is_escaped():
    for cp in [*range(0x20), 0x7F, *range(0x80, 0xA0)]:
        out = visible(chr(cp))
        assert out in (ESCAPED.get(chr(cp)), f"\\u{cp:04x}"), hex(cp)
        assert UNSAFE.search(out) is None


def test_hostile_label_is_one_inert_line():
    out = visible(HOSTILE)
    assert out == (
        "ok\\n2026-01-01 00:00:00  completed  fake\\u001b[2K"
        "\\u001b]0;owned\\u0007\\u001b]52;c;aGVsbG8=\\u0007"
    )
    assert len(out.splitlines()) == 1
    assert ESC not in out
    assert "\x07" not in out


def test_ordinary_text_is_byte_identical():
    assert visible(KEPT) == KEPT
    assert visible("back\\slash \\n \\u001b") == "back\\slash \\n \\u001b"
    assert visible("") == ""
    assert visible(None) == ""
    assert visible(42) == "42"


def test_idempotent():
    once = visible(HOSTILE + "".join(ESCAPED))
    assert visible(once) == once


def test_json_text_stays_the_same_json():
    # the escapes are JSON's own: JSON text made visible decodes to the same value
    value = {"label": HOSTILE + "".join(ESCAPED), "n": [1, "\u202eevil"]}
    text = json.dumps(value, ensure_ascii=False)
    assert json.loads(visible(text)) == value
    assert UNSAFE.search(visible(text)) is None


def test_visible_lines_keeps_our_line_breaks_only():
    out = visible_lines("tree\n  ✓ SQL: x" + ESC + "[2K\n  → done")
    assert out.split("\n") == ["tree", "  ✓ SQL: x\\u001b[2K", "  → done"]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "GET http://alice:s3cret@api.example/x failed",
            "GET http://alice:***@api.example/x failed",
        ),
        (
            "invalid URL 'http://bob:pa ss@host:99999/': bad port",
            "invalid URL 'http://bob:***@host:99999/': bad port",
        ),
        ("https://u:p@ss@host/", "https://u:***@host/"),
        ("https://:token@host", "https://:***@host"),
        (
            "postgresql://svc:pw@db1,db2/app?sslmode=require",
            "postgresql://svc:***@db1,db2/app?sslmode=require",
        ),
        ("a http://x:1@h/ and ftp://y:2@g", "a http://x:***@h/ and ftp://y:***@g"),
        # not userinfo: kept
        ("http://user@host/", "http://user@host/"),
        ("http://host:8080/users/bob@example.com", "http://host:8080/users/bob@example.com"),
        ("no url here: a:b@c", "no url here: a:b@c"),
    ],
)
def test_mask_userinfo(text, want):
    assert mask_userinfo(text) == want


def test_for_log_escapes_then_masks():
    out = for_log("http://u:sec\x7fret\nx@host/ " + ESC + "[2K")
    assert out == "http://u:***@host/ \\u001b[2K"


# -- where the CLI uses it: top's frame and the diagrams' labels (pure) ---------------------


def _top_state(label: str, host: str, version: str, error: str) -> TopState:
    return TopState(
        taken_at="2025-01-01T12:00:00+00:00",
        database="app",
        counts={"pending": 0, "running": 1, "completed": 0, "failed": 1, "cancelled": 0},
        inflight=[
            {
                "instance_id": "abcd1234",
                "node_id": "00000001",
                "node_type": "SLEEP",
                "label": label,
                "seconds": 1.0,
                "query": "5",
            }
        ],
        workers=[
            {
                "host": host,
                "pid": 1,
                "version": version,
                "in_flight": 0,
                "seen_seconds_ago": 1.0,
                "up_seconds": 2.0,
            }
        ],
        failures=[
            {
                "instance_id": "ffff0000",
                "label": label,
                "at": None,
                "node_type": "SQL",
                "error": error,
            }
        ],
    )


def test_top_frame_one_row_per_value():
    out = render(
        _top_state(
            HOSTILE,
            "h" + ESC + "]0;x\x07",
            "v" + ESC + "[2K",
            "boom\n2026 completed" + ESC + "]52;c;eA==\x07",
        ),
        width=200,
    )
    plain = render(_top_state("nightly", "h", "v", "boom"), width=200)
    assert UNSAFE.search(out.replace("\n", "")) is None
    assert len(out.split("\n")) == len(plain.split("\n"))
    assert "\\u001b]52;c;eA==\\u0007" in out


def _graph(signal: str, comment: str) -> dict[str, object]:
    return {
        "node_type": "THEN",
        "left_node": {"node_type": "SQL", "query": "select 1 -- " + comment},
        "right_node": {"node_type": "SIGNAL", "query": json.dumps({"signal_name": signal})},
    }


def test_diagram_labels_are_visible():
    d = diagram.from_graph(_graph("go" + ESC + "]0;t\x07\nx", HOSTILE))
    plain = diagram.from_graph(_graph("go", "fine"))
    for render_ in (diagram.mermaid, diagram.dot):
        text = render_(d)
        assert UNSAFE.search(text.replace("\n", "")) is None
        assert len(text.split("\n")) == len(render_(plain).split("\n"))
    assert "SIGNAL 'go\\u001b]0;t\\u0007\\nx'" in [n.label for n in d.nodes.values()]


# -- the SQL twin: df._visible agrees with visible() on every server -------------------------


def test_sql_twin_agrees(tx):
    samples = [
        KEPT,
        HOSTILE,
        "".join(ESCAPED).replace("\x00", ""),
        "".join(chr(c) for c in [*range(1, 0x20), *range(0x7F, 0xA1)]),
        "x\u2027\u202f\u2065\u206a y",
    ]
    for text in samples:
        got = tx.execute("select df._visible(%s)", (text,)).fetchone()[0]
        assert got == visible(text), repr(text)
    assert tx.execute("select df._visible(null)").fetchone()[0] is None


def test_sql_twin_ignores_standard_conforming_strings(tx):
    tx.execute("set local standard_conforming_strings = off")
    assert tx.execute("select df._visible(%s)", (HOSTILE,)).fetchone()[0] == visible(HOSTILE)
