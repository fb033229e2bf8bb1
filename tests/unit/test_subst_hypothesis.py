"""Property tests of pgdurable.subst quoting: any value round-trips and stays one token.

The literal is decoded by a small model of PostgreSQL's lexer for string literals, under
both settings of ``standard_conforming_strings`` (no database needed).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pgdurable.errors import SubstitutionError  # noqa: E402
from pgdurable.subst import substitute  # noqa: E402

# PostgreSQL text cannot hold NUL; everything else is fair game.
text_values = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=300)
# Biased towards the characters that matter to the SQL lexer.
nasty_values = st.text(alphabet=st.sampled_from("'\\$*/-\n\r\tEe x0\"ü;"), max_size=60)

_E_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)", re.S)
_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def lex_literal(sql: str, pos: int, *, scs: bool) -> tuple[str, int]:
    """Lex one string literal at ``sql[pos:]`` like PostgreSQL; return (value, end)."""
    escape = sql.startswith(("E'", "e'"), pos)
    i = pos + (2 if escape else 1)
    assert sql[i - 1] == "'"
    backslashes = escape or not scs
    out: list[str] = []
    while True:
        c = sql[i]  # IndexError = unterminated literal = test failure
        if c == "'":
            if i + 1 < len(sql) and sql[i + 1] == "'":
                out.append("'")
                i += 2
                continue
            return "".join(out), i + 1
        if c == "\\" and backslashes:
            m = _E_ESCAPE.match(sql, i)
            assert m is not None
            e = m.group(1)
            if e[0] == "x":
                out.append(chr(int(e[1:], 16)))
            elif e[0] in "01234567":
                out.append(chr(int(e, 8)))
            elif e[0] in "uU" and len(e) > 1:
                out.append(chr(int(e[1:], 16)))
            else:
                out.append(_SIMPLE.get(e, e))
            i = m.end()
            continue
        out.append(c)
        i += 1


def run(text: str, value: Any, mode: str = "sql") -> str:
    results = {"x": {"rows": [{"v": value}], "row_count": 1, "columns": ["v"]}}
    return substitute(text, mode=mode, results=results, vars={}, instance_id="i", label=None)  # type: ignore[arg-type]


@settings(max_examples=400)
@given(st.one_of(text_values, nasty_values))
def test_sql_literal_round_trips(value: str) -> None:
    out = run("select $x", value)
    assert out.startswith("select ")
    for scs in (True, False):
        decoded, end = lex_literal(out, len("select "), scs=scs)
        assert decoded == value
        assert end == len(out)  # exactly one token, nothing after it


@settings(max_examples=300)
@given(st.one_of(text_values, nasty_values))
def test_literal_cannot_leave_its_context(value: str) -> None:
    lit = run("$x", value)
    # a dollar-quoted body, a line comment and a block comment all stay closed
    assert "$" not in lit
    assert "\n" not in lit
    assert "\r" not in lit
    assert "*" not in lit
    for prefix in ("", "E", "e", "N", "10-", "x = "):
        # text right before the ref never changes how the literal lexes: an E or e
        # turns a plain literal into an escape string, which reads it the same
        out = run(prefix + "$x", value)
        assert out.startswith(prefix)
        start = len(prefix)
        if prefix in ("E", "e") and out[start] == "'":
            start -= 1
        # (an escape string after E lexes as the identifier EE then the literal: a syntax
        # error, never an injection; lexing from the literal itself is what we check)
        for scs in (True, False):
            decoded, end = lex_literal(out, start, scs=scs)
            assert decoded == value
            assert end == len(out)


@given(st.one_of(text_values, nasty_values))
def test_raw_mode_inserts_strings_verbatim(value: str) -> None:
    assert run("<$x>", value, mode="raw") == f"<{value}>"


@given(st.one_of(text_values, nasty_values), st.one_of(text_values, nasty_values))
def test_inserted_values_are_not_rescanned(a: str, b: str) -> None:
    results = {
        "a": {"rows": [{"v": a}], "row_count": 1, "columns": ["v"]},
        "b": {"rows": [{"v": b}], "row_count": 1, "columns": ["v"]},
    }
    out = substitute("$a|$b", mode="raw", results=results, vars={}, instance_id="i", label=None)
    assert out == f"{a}|{b}"


@given(st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.booleans())
def test_scalars_render_as_sql_numbers(value: Any) -> None:
    out = run("select 1-$x", value)
    tail = out.removeprefix("select 1-")
    assert "--" not in out
    if isinstance(value, bool):
        assert tail == str(value).lower()
    else:
        assert float(tail.strip("()")) == float(value)


@given(st.tuples(text_values, text_values).map(lambda t: t[0] + "\x00" + t[1]))
def test_nul_fails(value: str) -> None:
    with pytest.raises(SubstitutionError, match="NUL"):
        run("$x", value)
