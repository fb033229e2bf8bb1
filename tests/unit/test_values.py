"""Unit tests of pgdurable.values: envelope, truthiness (docs/api.md "Conditions"), break values, size cap."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from pgdurable.errors import ResultTooLarge, StepError
from pgdurable.values import (
    break_value,
    check_size,
    json_text,
    sql_envelope,
    truthy,
)

# -- sql_envelope ------------------------------------------------------------------------


def test_envelope_keeps_column_order():
    env = sql_envelope(['{"z": 1, "a": "x", "m": null}', '{"z": 2, "a": "y", "m": [1]}'])
    assert env == {
        "rows": [{"z": 1, "a": "x", "m": None}, {"z": 2, "a": "y", "m": [1]}],
        "row_count": 2,
        "columns": ["z", "a", "m"],
    }
    assert list(env["rows"][0]) == ["z", "a", "m"]
    assert list(env) == ["rows", "row_count", "columns"]


def test_envelope_empty():
    assert sql_envelope([]) == {"rows": [], "row_count": 0, "columns": []}


def test_envelope_duplicate_column_keeps_last():
    assert sql_envelope(['{"a":1,"a":2}'])["rows"] == [{"a": 2}]


def test_envelope_out_of_range_number_does_not_fail():
    # beyond a double, kept exactly: written back as PostgreSQL's numeric text
    env = sql_envelope(['{"j": 1e400}'])
    assert env["rows"][0]["j"] == Decimal("1e400")
    assert check_size(env, 0, "x") == (
        b'{"rows":[{"j":1' + b"0" * 400 + b'}],"row_count":1,"columns":["j"]}'
    )


def test_envelope_rejects_non_objects():
    with pytest.raises(StepError, match="not a json object"):
        sql_envelope(["[1]"])
    with pytest.raises(StepError, match="not valid json"):
        sql_envelope(["{nope"])


# -- truthy ------------------------------------------------------------------------------


def env(*values):
    return sql_envelope([orjson.dumps({"c": v, "d": 1}).decode() for v in values])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (None, False),
        (0, False),
        (1, True),
        (-1, True),
        (0.0, False),
        (0.5, True),
        ("", False),
        ("   ", False),
        ("true", True),
        ("TRUE", True),
        (" t ", True),
        ("Yes", True),
        ("false", False),
        ("F", False),
        ("NO", False),
        (" no\n", False),
        ("0", False),
        ("0.000", False),
        ("-0", False),
        ("+0e10", False),
        ("1", True),
        ("0.01", True),
        ("1e-400", True),
        ("-3", True),
        ("nan", True),
        ("inf", True),
        ("0x0", True),
        ("off", True),
        ("hello", True),
        ([], False),
        ([0], True),
        ({}, False),
        ({"a": None}, True),
    ],
)
def test_truthy_whole_value(value, expected):
    assert truthy(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (None, False),
        (0, False),
        ("no", False),
        ("x", True),
        ([], False),
        ({"k": 1}, True),
    ],
)
def test_truthy_first_column_of_first_row(value, expected):
    assert truthy(env(value, True)) is expected


def test_truthy_zero_rows_false():
    assert truthy(sql_envelope([])) is False
    assert truthy({"rows": [], "row_count": 0}) is False


def test_truthy_uses_columns_order():
    r = {"rows": [{"a": True, "b": False}], "row_count": 1, "columns": ["b", "a"]}
    assert truthy(r) is False
    r2 = {"rows": [{"a": True, "b": False}], "row_count": 1}
    assert truthy(r2) is True


def test_truthy_row_without_columns_false():
    assert truthy({"rows": [{}], "row_count": 1, "columns": []}) is False


def test_truthy_non_row_objects():
    assert truthy({"status": 500, "ok": False}) is True  # non-empty object
    assert truthy({"rows": "not a list"}) is True  # not a row set: a non-empty object
    assert truthy([sql_envelope([])]) is True  # JOIN array


# -- break_value -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("42", 42),
        ("1.5", 1.5),
        ("true", True),
        ("null", None),
        ('"quoted"', "quoted"),
        ('{"a": [1, 2]}', {"a": [1, 2]}),
        ("done", "done"),
        ("", ""),
        ("  ", "  "),
        ("{not json", "{not json"),
        ("NaN", "NaN"),
        ("12345678901234567890123", 12345678901234567890123),
    ],
)
def test_break_value(text, expected):
    assert break_value(text) == expected


def test_break_value_keeps_big_ints_exact():
    v = break_value('{"n": 123456789012345678901234567890, "f": 1.5, "s": "x"}')
    assert v == {"n": 123456789012345678901234567890, "f": 1.5, "s": "x"}
    assert json_text(v) == '{"n":123456789012345678901234567890,"f":1.5,"s":"x"}'


def test_envelope_keeps_big_ints_exact():
    env = sql_envelope(['{"j": [99999999999999999999999]}'])
    assert env["rows"][0]["j"] == [99999999999999999999999]


def test_break_value_rejects_non_json_constants():
    assert break_value("Infinity") == "Infinity"
    assert break_value("[NaN]") == "[NaN]"
    assert break_value("[1e400, 12345678901234567890123]") == [
        Decimal("1e400"),
        12345678901234567890123,
    ]


# -- check_size / json_text --------------------------------------------------------------


def test_check_size_returns_encoding():
    assert check_size({"b": 1, "a": [True, None]}, 100, "x") == b'{"b":1,"a":[true,null]}'


def test_check_size_at_limit_ok_over_fails():
    value = "x" * 8  # '"xxxxxxxx"' = 10 bytes
    assert len(check_size(value, 10, "r")) == 10
    with pytest.raises(ResultTooLarge) as err:
        check_size(value, 9, "result of node 'load'")
    msg = str(err.value)
    assert "result of node 'load'" in msg
    assert "10 bytes" in msg
    assert "limit of 9 bytes" in msg
    assert "pg_durable.max_result_bytes" in msg
    assert isinstance(err.value, StepError)


def test_check_size_names_custom_setting():
    with pytest.raises(ResultTooLarge, match=r"raise pgdurable\.http_max_body"):
        check_size("x" * 100, 10, "http body", setting="pgdurable.http_max_body")


def test_check_size_zero_limit_is_unlimited():
    assert check_size("x" * 1000, 0, "r") == orjson.dumps("x" * 1000)


def test_json_text_big_ints_fall_back_to_stdlib():
    assert json_text({"a": [10**30, "ü"]}) == '{"a":[' + str(10**30) + ',"ü"]}'
    assert json_text({"a": 1}) == '{"a":1}'


def test_statements_without_rows_say_how_many_they_affected():
    # the runner's one bare number: a DML without RETURNING (pg_durable's rows/row_count kept)
    assert sql_envelope(["100"]) == {
        "rows": [],
        "row_count": 0,
        "columns": [],
        "rows_affected": 100,
    }
    assert sql_envelope(["0"]) == {"rows": [], "row_count": 0, "columns": [], "rows_affected": 0}
    # a runner made by schema version 3 sends nothing for them: no rows_affected then
    assert sql_envelope([]) == {"rows": [], "row_count": 0, "columns": []}
    # a bare number among result rows is not a count: rows are objects
    with pytest.raises(StepError, match="is not a json object"):
        sql_envelope(['{"a": 1}', "5"])
