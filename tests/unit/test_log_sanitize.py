"""Logs through the real setup (pgdurable.log.setup): a tenant's newline, carriage return or
terminal escape in a logged value never makes a new line or reaches the terminal raw, in the
message, in context fields or in a traceback; no URL password is ever logged; JSON logs stay
exact JSON of the same values."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from pgdurable import log

ESC = "\x1b"
FAKE = "2026-01-01 00:00:00,000 info pgdurable pid=1: fake"
# a tenant's exception message, as the issue reproduced it (plus CR, OSC 0 and OSC 52)
EVIL = (
    "x\n"
    + FAKE
    + ESC
    + "[2K\r"
    + FAKE
    + " again"
    + ESC
    + "]0;title\x07"
    + ESC
    + "]52;c;aGk=\x07\u202e\x9b"
)
REAL_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [a-z]+ pgdurable[\w.]* pid=\d+")


@pytest.fixture
def setup_log(capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    root = logging.getLogger("pgdurable")
    top = logging.getLogger()
    saved = (root.handlers[:], root.level, root.propagate)
    saved_top = top.handlers[:]

    def make(fmt: str) -> None:
        top.handlers[:] = []  # as in serve: nothing configured the root logger (pytest did)
        log.setup(fmt, logging.DEBUG)  # its handler writes to the captured sys.stderr

    yield make
    root.handlers[:], root.level, root.propagate = saved
    top.handlers[:] = saved_top
    log.instance_var.set(None)
    log.node_var.set(None)
    log.node_type_var.set(None)


def lines_of(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert err.endswith("\n")
    return err[:-1].split("\n")


def assert_no_forgery(lines: list[str]) -> None:
    for line in lines:
        assert not line.startswith(FAKE[:20]), line
        assert ESC not in line
        assert "\r" not in line
        assert re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", line) is None, line


def test_text_message_value_is_one_line(setup_log, capsys):
    setup_log("text")
    logger = logging.getLogger("pgdurable.worker.process")
    logger.info("step failed (sqlstate %s): %s", "P0001", EVIL, extra={"event": "step.failed"})
    logger.warning(EVIL)  # tenant text as the message itself
    lines = lines_of(capsys)
    assert len(lines) == 2
    assert all(REAL_LINE.match(line) for line in lines)
    assert_no_forgery(lines)
    assert lines[0].endswith(
        ": step failed (sqlstate P0001): x\\n"
        + FAKE
        + "\\u001b[2K\\r"
        + FAKE
        + " again\\u001b]0;title\\u0007\\u001b]52;c;aGk=\\u0007"
        "\\u202e\\u009b"
    )


def test_text_context_fields(setup_log, capsys):
    setup_log("text")
    log.instance_var.set("abcd1234\n" + FAKE)
    log.node_var.set("0001" + ESC + "[2K")
    log.node_type_var.set("SQL\r")
    logging.getLogger("pgdurable.x").info("hello")
    lines = lines_of(capsys)
    assert len(lines) == 1
    assert_no_forgery(lines)
    assert "instance=abcd1234\\n2026" in lines[0]
    assert "node=0001\\u001b[2K type=SQL\\r:" in lines[0]


def test_text_traceback_messages_stay_inside_their_lines(setup_log, capsys):
    setup_log("text")
    logger = logging.getLogger("pgdurable.worker.process")
    try:
        try:
            raise ValueError(EVIL)
        except ValueError as inner:
            exc = RuntimeError("outer " + EVIL)
            exc.add_note("note " + EVIL)
            raise exc from inner
    except RuntimeError:
        logger.exception("internal error while running a step (attempt %d)", 2)
    lines = lines_of(capsys)
    assert_no_forgery(lines)
    assert REAL_LINE.match(lines[0])
    # the record's line, then traceback lines: each message is one of them, escaped
    assert sum(line.startswith("ValueError: x\\n2026") for line in lines) == 1
    assert sum(line.startswith("RuntimeError: outer x\\n2026") for line in lines) == 1
    assert sum(line.startswith("note x\\n2026") for line in lines) == 1
    assert not any(REAL_LINE.match(line) for line in lines[1:])


def test_exception_group_messages_are_escaped(setup_log, capsys):
    setup_log("text")
    try:
        raise ExceptionGroup("group " + EVIL, [ValueError("a " + EVIL), KeyError(EVIL)])
    except ExceptionGroup:
        logging.getLogger("pgdurable.x").exception("batch runner error")
    lines = lines_of(capsys)
    assert_no_forgery(lines)
    assert not any(REAL_LINE.match(line) for line in lines[1:])


def test_url_passwords_are_never_logged(setup_log, capsys):
    setup_log("text")
    logger = logging.getLogger("pgdurable.steps.http_step")
    url = "http://alice:pa ss@api.example:99999/x"
    logger.warning("step failed: invalid URL %r: bad port", url)
    try:
        raise ValueError(f"invalid URL {url!r}")
    except ValueError:
        logger.exception("with a traceback")
    setup_log("json")
    logger.warning("step failed: invalid URL %s", "https://bob:hunter2@h/?q=1")
    try:
        raise ValueError("postgresql://svc:hunter2@db/app")
    except ValueError:
        logger.exception("json traceback")
    out = capsys.readouterr().err
    assert "pa ss" not in out
    assert "hunter2" not in out
    assert out.count("alice:***@api.example") == 2  # the message and the ValueError line
    assert "bob:***@h/?q=1" in out
    assert "svc:***@db/app" in out


def test_json_is_one_line_with_the_exact_values(setup_log, capsys):
    setup_log("json")
    logger = logging.getLogger("pgdurable.worker.process")
    log.instance_var.set("abcd1234")
    logger.info(
        "step failed (sqlstate %s): %s",
        "P0001",
        EVIL,
        extra={"event": "step.failed", "sqlstate": "P0001"},
    )
    logger.info("plain é 日本 \\n")
    lines = lines_of(capsys)
    assert len(lines) == 2
    assert_no_forgery(lines)
    rec = json.loads(lines[0])
    assert rec["msg"] == "step failed (sqlstate P0001): " + EVIL  # exact, decoded
    assert rec["instance"] == "abcd1234"
    assert rec["event"] == "step.failed"
    assert rec["sqlstate"] == "P0001"
    # ordinary text: the same bytes as before (orjson's own)
    assert '"msg":"plain é 日本 \\\\n"' in lines[1]


def test_third_party_warnings_and_bad_templates(setup_log, capsys):
    setup_log("text")
    # a library's own logger (not under pgdurable): the same formatter, not the raw last resort
    logging.getLogger("asyncio").error("Task exception was never retrieved: %s", EVIL)
    logging.getLogger("pgdurable.x").warning("two values %s %s", EVIL)  # a template bug
    lines = lines_of(capsys)
    assert len(lines) == 2, lines
    assert_no_forgery(lines)
    assert " error asyncio pid=" in lines[0]
    assert "the arguments do not fit the message" in lines[1]
