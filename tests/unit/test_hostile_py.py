# ruff: noqa: PT017, PT018  (property checks: compound asserts and asserts on caught errors)
"""Hostile input to the pure-Python parts (issue 8, part 2): subst, cron, values.

Beyond tests/unit/test_subst_hypothesis.py (literal quoting): random templates full of
``$``/``{}``/quotes/unicode against random results and vars, huge values, whole-value refs,
random cron strings and random JSON. Every input either works or raises the module's own
clear error (SubstitutionError / ValueError / StepError) — never another exception, and
never slowly.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pgdurable import cron  # noqa: E402
from pgdurable.errors import StepError, SubstitutionError  # noqa: E402
from pgdurable.subst import substitute, substitute_whole_value  # noqa: E402
from pgdurable.values import break_value, check_size, sql_envelope, truthy  # noqa: E402

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_value = st.recursive(
    json_scalar,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
    max_leaves=8,
)


@st.composite
def results(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in draw(st.lists(names, max_size=4, unique=True)):
        if draw(st.booleans()):
            cols = draw(st.lists(names, min_size=0, max_size=3, unique=True))
            rows = draw(st.lists(st.fixed_dictionaries({c: json_value for c in cols}), max_size=3))
            out[name] = {"rows": rows, "row_count": len(rows), "columns": cols}
        else:
            out[name] = draw(json_value)
    return out


@st.composite
def templates(draw: st.DrawFn, refs: list[str]) -> str:
    pieces = st.one_of(
        text,
        st.sampled_from(
            [
                "$",
                "$$",
                "{",
                "}",
                "{}",
                "{{x}}",
                "'",
                '"',
                "E'",
                "\\",
                "--",
                "/*",
                "$1",
                "$x$",
                "{sys_instance_id}",
                "{sys_label}",
                ".*",
                "?",
                ".c",
                "ü",
                "🙂",
                "\n",
                "$tag$",
                "${x}",
                "{$x}",
            ]
        ),
        st.sampled_from([f"${r}" for r in refs] or ["$nope"]).flatmap(
            lambda r: st.sampled_from(
                [r, r + "?", r + ".*", r + ".c", r + ".c?", r + "x", r + "$", "{" + r[1:] + "}"]
            )
        ),
    )
    return "".join(draw(st.lists(pieces, max_size=12)))


@SETTINGS
@given(
    data=st.data(),
    res=results(),
    vars=st.dictionaries(names | text, text, max_size=4),
    label=st.none() | text,
    mode=st.sampled_from(["sql", "raw"]),
)
def test_substitute_works_or_raises_substitution_error(
    data: st.DataObject, res: dict[str, Any], vars: dict[str, str], label: str | None, mode: str
) -> None:
    tpl = data.draw(templates(list(res) + list(vars)))
    try:
        out = substitute(
            tpl,
            mode=mode,
            results=res,
            vars=vars,  # type: ignore[arg-type]
            instance_id="abcd1234",
            label=label,
        )
    except SubstitutionError as exc:
        assert str(exc)  # names the reference
        return
    assert isinstance(out, str)
    if "$" not in tpl and "{" not in tpl:
        assert out == tpl


@SETTINGS
@given(tpl=text, mode=st.sampled_from(["sql", "raw"]))
def test_nothing_registered_changes_only_sys_braces(tpl: str, mode: str) -> None:
    out = substitute(
        tpl,
        mode=mode,
        results={},
        vars={},  # type: ignore[arg-type]
        instance_id="abcd1234",
        label="L",
    )
    assert out == tpl.replace("{sys_instance_id}", "abcd1234").replace("{sys_label}", "L") or (
        "{sys_" in tpl
    )


@SETTINGS
@given(value=text, other=names)
def test_var_values_are_not_rescanned_by_pass_one(value: str, other: str) -> None:
    vars = {"a": value + "{" + other + "}", other: "SHOULD-NOT-APPEAR"}
    out = substitute("<{a}>", mode="raw", results={}, vars=vars, instance_id="i", label=None)
    assert out == "<" + vars["a"] + ">"


@pytest.mark.parametrize("mode", ["sql", "raw"])
def test_huge_values_substitute_quickly(mode: str) -> None:
    big = "x'$*\\ü" * 200_000  # 1.2 M characters of the worst kind
    res = {"r": {"rows": [{"v": big}] * 3, "row_count": 3, "columns": ["v"]}}
    t0 = time.monotonic()
    out = substitute(
        "select $r, $r.v, {big} from $r.*",
        mode=mode,  # type: ignore[arg-type]
        results=res,
        vars={"big": big},
        instance_id="i",
        label=None,
    )
    assert time.monotonic() - t0 < 5
    assert len(out) > 4 * len(big)


def test_star_row_cap_is_enforced_quickly() -> None:
    res = {"r": {"rows": [{"v": 1}] * 10_001, "row_count": 10_001, "columns": ["v"]}}
    with pytest.raises(SubstitutionError, match="10001 rows"):
        substitute(
            "select * from $r.*", mode="sql", results=res, vars={}, instance_id="i", label=None
        )


@SETTINGS
@given(data=st.data(), res=results(), vars=st.dictionaries(names, text, max_size=3))
def test_whole_value_refs_work_or_raise_clearly(
    data: st.DataObject, res: dict[str, Any], vars: dict[str, str]
) -> None:
    tpl = data.draw(st.one_of(templates(list(res) + list(vars)), text))
    try:
        out = substitute_whole_value(tpl, results=res, vars=vars, instance_id="i", label=None)
    except SubstitutionError as exc:
        assert "whole-value reference" in str(exc) or "$" in str(exc)
        return
    if "$" not in tpl and "{" not in tpl:
        assert out == tpl


cron_field = st.one_of(
    st.sampled_from(
        [
            "*",
            "*/5",
            "0",
            "59",
            "60",
            "1-5",
            "5-1",
            "MON-FRI",
            "jan",
            "L",
            "LW",
            "5L",
            "5#2",
            "?",
            "*/0",
            "1/",
            "-",
            "7",
            "8",
            "99999999999999999999",
            "1,",
            "0-0/1",
            "*/1000000",
        ]
    ),
    st.text(alphabet=st.sampled_from("0123456789*/-,LW#?ABCDEFMNOSTUJ"), min_size=1, max_size=8),
)
cron_exprs = st.one_of(
    st.lists(cron_field, max_size=7).map(" ".join),
    text,
    st.sampled_from(["@daily", "@reboot", "@", " @HOURLY "]),
)


@SETTINGS
@given(
    expr=cron_exprs,
    after=st.datetimes(
        min_value=datetime(1970, 1, 1),  # noqa: DTZ001
        max_value=datetime(2200, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
)
def test_cron_works_or_raises_value_error(expr: str, after: datetime) -> None:
    t0 = time.monotonic()
    try:
        cron.validate(expr)
        tick = cron.next_tick(expr, after)
    except ValueError as exc:
        assert "cron expression" in str(exc)
        return
    finally:
        assert time.monotonic() - t0 < 5, expr
    assert tick > after and tick.tzinfo is not None
    assert tick.utcoffset() == timedelta(0)
    assert tick.second == 0 and tick.microsecond == 0


def test_cron_rejects_non_text() -> None:
    for bad in (None, 5, b"* * * * *"):
        with pytest.raises(ValueError, match="must be text"):
            cron.validate(bad)  # type: ignore[arg-type]


@SETTINGS
@given(value=json_value)
def test_truthy_and_break_values_never_crash(value: Any) -> None:
    assert truthy(value) in (True, False)
    assert truthy({"rows": [{"v": value}], "row_count": 1, "columns": ["v"]}) in (True, False)
    encoded = json.dumps(value, ensure_ascii=False)
    # numbers exact as written (a float's text, not its binary value): Decimal where needed
    assert break_value(encoded) == json.loads(encoded, parse_float=Decimal)


@SETTINGS
@given(
    raw=st.one_of(
        text,
        st.sampled_from(
            ["NaN", "Infinity", "1e400", "-0", "[", "{", "9" * 400, '"\\ud800"', "\x00"]
        ),
    )
)
def test_break_value_text(raw: str) -> None:
    v = break_value(raw)
    if isinstance(v, str) and v == raw:
        return
    assert json.loads(raw, parse_float=Decimal) == v  # parsed JSON, numbers exact


@SETTINGS
@given(
    rows=st.lists(
        st.one_of(st.dictionaries(text, json_value, max_size=3), json_value, text), max_size=3
    )
)
def test_sql_envelope_works_or_raises_step_error(rows: list[Any]) -> None:
    texts = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    try:
        env = sql_envelope(texts)
    except StepError as exc:
        assert "postgresql" in str(exc)
        return
    if "rows_affected" in env:
        # one bare integer: the runner's count of a statement without result rows
        assert len(rows) == 1
        assert env == {
            "rows": [],
            "row_count": 0,
            "columns": [],
            "rows_affected": json.loads(texts[0]),
        }
        return
    assert env["row_count"] == len(rows)
    assert env["columns"] == (list(env["rows"][0]) if rows else [])


@SETTINGS
@given(value=json_value, limit=st.integers(-1, 200))
def test_check_size(value: Any, limit: int) -> None:
    try:
        data = check_size(value, limit, "result of node 'x'")
    except StepError as exc:
        if "NUL character" in str(exc):  # jsonb cannot hold \u0000: refused whatever the size
            assert "\\u0000" in json.dumps(value)
            return
        assert "over the limit" in str(exc) and "pg_durable.max_result_bytes" in str(exc)
        assert limit > 0
        return
    assert limit <= 0 or len(data) <= limit
    assert b"\\u0000" not in data or b"\\\\u0000" in data
