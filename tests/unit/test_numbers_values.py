"""Numbers keep every digit and their scale through pgdurable.values (issue 12, item 1).

Results stay JSON numbers, exact, as PostgreSQL's jsonb stores them: parsed as int (within
64 bits) or Decimal, written back as PostgreSQL's numeric text. No database here; the same
properties against PostgreSQL itself are in tests/sql/test_numbers_conversion.py.
"""

from __future__ import annotations

import json
import timeit
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgdurable.errors import StepError
from pgdurable.values import break_value, check_size, json_text, loads, number_text, truthy


def _exact(text: str) -> Any:
    """The reference parse: every fraction/exponent a Decimal, every integer exact."""

    def num_int(s: str) -> Any:
        v = Decimal(s)
        return int(v) if -(2**63) <= v < 2**64 else v  # what orjson reads exactly

    return json.loads(text, parse_float=Decimal, parse_int=num_int)


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types, Decimals with equal exponents (12.50 is not 12.5)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Decimal):
        return a.as_tuple() == b.as_tuple()
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


ROW = '{"n":12345678901234567890.123456789,"m":12.50,"i":5,"big":9223372036854775807}'


def test_a_row_round_trips_text_for_text():
    value = loads(ROW)
    assert value == {
        "n": Decimal("12345678901234567890.123456789"),
        "m": Decimal("12.50"),
        "i": 5,
        "big": 9223372036854775807,
    }
    assert str(value["m"]) == "12.50"
    assert json_text(value) == ROW


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.50", "12.50"),
        ("1E-7", "0.0000001"),  # PostgreSQL's numeric text: plain notation
        ("1.5E+300", "15" + "0" * 299),
        ("-0.000", "-0.000"),
        ("0E+5", "0"),
        ("0E-3", "0.000"),
        ("1e-400", "0." + "0" * 399 + "1"),
        ("9.99e131071", "999" + "0" * 131069),
        ("1e-16383", "0." + "0" * 16382 + "1"),
        ("NaN", '"NaN"'),  # to_json writes numeric NaN/Infinity as strings
        ("Infinity", '"Infinity"'),
        ("-Infinity", '"-Infinity"'),
    ],
)
def test_number_text(text, expected):
    assert number_text(Decimal(text)) == expected


@pytest.mark.parametrize("text", ["1e131072", "10e131071", "1.5e-16383", "1e-20000", "1e999999999"])
def test_numbers_beyond_numeric_fail_with_a_clear_message(text):
    with pytest.raises(ValueError, match="beyond the range of PostgreSQL's numeric"):
        number_text(Decimal(text))
    # as a step result: the step fails, saying why (jsonb could not store it either)
    value = loads('{"j": ' + text + "}")
    with pytest.raises(StepError, match=r"step result cannot be stored: the number .* beyond"):
        check_size(value, 0, "step result")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ('{"a": 1}', int),
        ('{"a": -123456789012345678}', int),
        ('{"a": 1234567890123456789}', int),
        ('{"a": -9223372036854775808}', int),
        ('{"a": 18446744073709551615}', int),
        ('{"a": 18446744073709551616}', Decimal),
        ('{"a": -9223372036854775809}', Decimal),
        ('{"a": 1.0}', Decimal),
        ('{"a": 1e2}', Decimal),
        ('{"a": -0.5E-3}', Decimal),
        ("[ 2.5 ]", Decimal),
        ("12.50", Decimal),
        ("7", int),
        ('{"a" : 1.5\n}', Decimal),
    ],
)
def test_number_types(text, kind):
    value = loads(text)
    inner = (
        value
        if not isinstance(value, dict | list)
        else (value["a"] if isinstance(value, dict) else value[0])
    )
    assert type(inner) is kind
    assert _same(value, _exact(text))


def test_text_that_only_looks_like_numbers_keeps_the_fast_path_and_its_values():
    text = '{"at":"2024-01-01 10:00:00.123+00","v":"1.5","w":"a:1.5,b","i":[1,2]}'
    assert loads(text) == orjson.loads(text)


def test_bytes_and_memoryview_like_the_psycopg_loader():
    assert str(loads(b'{"m": 12.50}')["m"]) == "12.50"
    assert str(loads(memoryview(b"[12.50]"))[0]) == "12.50"
    with pytest.raises(ValueError):
        loads(b"\xff")


def test_encoding_without_orjson_limits_stays_exact():
    # an int beyond 64 bits (and beyond int's 4300-digit str() limit), nested past orjson's
    # 254 levels: the slow encoder, every number exact
    assert json_text([10**5000]) == "[1" + "0" * 5000 + "]"
    deep: Any = Decimal("12.50")
    for _ in range(300):
        deep = [deep]
    assert json_text(deep) == "[" * 300 + "12.50" + "]" * 300
    assert (
        json_text({"a": [True, None, "ü", 1.5, 2**70]})
        == '{"a":[true,null,"ü",1.5,' + str(2**70) + "]}"
    )
    with pytest.raises(ValueError, match="lone surrogate"):
        json_text([2**70, "\ud800"])


def test_truthy_judges_decimals_by_value():
    assert truthy(Decimal("1e-400")) is True  # a float would say 0
    assert truthy(Decimal("0.000")) is False
    assert truthy(loads('{"rows": [{"c": 0.00}], "columns": ["c"]}')) is False
    assert truthy(loads('{"rows": [{"c": 1e-400}], "columns": ["c"]}')) is True


def test_break_values_keep_digits():
    assert (
        json_text(break_value('{"m": 12.50, "n": 123456789012345678901234567890}'))
        == '{"m":12.50,"n":123456789012345678901234567890}'
    )


# -- properties --------------------------------------------------------------------------

_numbers = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.from_regex(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,4})?", fullmatch=True),
)
_ws = st.sampled_from(["", " ", "\n", "\t "])
_strings = st.text(alphabet='0123456789.eE:,[]{} -"\\x', max_size=20).map(json.dumps)


@st.composite
def _docs(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON text with numbers in every position, odd whitespace, and strings that look like
    numbers and delimiters (the fast path must still see every number)."""
    kind = draw(st.sampled_from(["num", "str", "arr", "obj"] if depth < 3 else ["num", "str"]))
    w = draw(_ws)
    if kind == "num":
        return w + draw(_numbers) + w
    if kind == "str":
        return w + draw(_strings) + w
    items = draw(st.lists(_docs(depth + 1), max_size=4))
    if kind == "arr":
        return w + "[" + ",".join(items) + "]" + w
    keys = draw(st.lists(_strings, min_size=len(items), max_size=len(items)))
    return w + "{" + ",".join(f"{k}{w}:{v}" for k, v in zip(keys, items, strict=True)) + "}" + w


@settings(max_examples=300, deadline=None)
@given(text=_docs())
def test_every_number_parses_exactly(text):
    assert _same(loads(text), _exact(text))
    assert _same(loads(text.encode()), _exact(text))


def _as_numeric(value: Any) -> Any:
    """What PostgreSQL's numeric keeps of a number: its value and its scale (1E+2 is 100)."""
    if isinstance(value, dict):
        return {k: _as_numeric(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_numeric(v) for v in value]
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        exponent = Decimal(value).as_tuple().exponent
        return ("number", Decimal(value), max(0, -exponent))  # type: ignore[operator]
    return value


def _storable(value: Any) -> bool:
    try:
        json_text(value)
    except ValueError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(text=_docs())
def test_encoding_then_parsing_keeps_value_and_scale(text):
    value = loads(text)
    if not _storable(value):  # only a number numeric cannot hold: said so, tested above
        return
    assert _as_numeric(loads(json_text(value))) == _as_numeric(value)


def test_parse_cost_of_a_typical_row_is_small():
    """The parse runs once per step (issue 14 is about CPU per step): a typical small row
    stays on orjson's fast path, a row with numerics pays the exact parse. Printed with -s;
    the bound only catches a pathological regression (a slow machine stays far below it)."""
    plain = '{"id":42,"name":"alice","at":"2024-01-01 10:00:00.123+00","ok":true}'
    money = '{"id":42,"amount":12.50,"rate":0.0725,"at":"2024-01-01 10:00:00.123+00"}'
    n = 20000
    costs = {
        name: min(timeit.repeat(lambda t=t: loads(t), number=n, repeat=3)) / n * 1e6
        for name, t in [("plain", plain), ("numeric", money)]
    }
    base = min(timeit.repeat(lambda: orjson.loads(plain), number=n, repeat=3)) / n * 1e6
    print(
        f"\nparse µs/row: orjson alone {base:.2f}, plain row {costs['plain']:.2f}, "
        f"row with numerics {costs['numeric']:.2f}"
    )
    assert costs["plain"] < 50
    assert costs["numeric"] < 200


def test_http_request_bodies_and_timeouts_keep_numbers():
    from pgdurable.steps.http_step import HttpPolicy, _request_body, _timeout

    # a body given as a JSON value (a graph written as JSON) is sent with its digits
    config = loads(
        '{"body": {"amount": 12.50, "id": 123456789012345678901234567890}, "timeout_seconds": 1.5}'
    )
    assert _request_body(config["body"]) == b'{"amount":12.50,"id":123456789012345678901234567890}'
    assert _timeout(config["timeout_seconds"], HttpPolicy()) == 1.5
