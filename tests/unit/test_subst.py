"""Unit tests of pgdurable.subst (docs/api.md "Substitution"): no database, no I/O."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from pgdurable.errors import StepError, SubstitutionError
from pgdurable.subst import sql_literal, substitute, substitute_whole_value
from pgdurable.values import sql_envelope


def rows(*objs: dict[str, Any]) -> dict[str, Any]:
    return sql_envelope([orjson.dumps(o).decode() for o in objs])


RESULTS: dict[str, Any] = {
    "total": rows({"sum": 42, "label": "x"}),
    "tot": rows({"n": 7}),
    "name": rows({"name": "O'Brien"}),
    "empty": rows(),
    "nul": rows({"v": None, "w": 1}),
    "multi": rows(
        {"id": 1, "s": "a", "j": {"k": [1]}, "b": True, "z": None},
        {"id": 2, "s": "b'c", "j": [], "b": False, "z": 2.5},
    ),
    "http": {"status": 200, "body": "hello", "ok": True, "headers": {"a": "b"}, "none": None},
    "sig": {"signal_name": "go", "timed_out": False, "data": {"x": 1}},
    "joined": [rows({"a": 1}), {"status": 204}],
    "brk": "done",
    "brk_num": 42,
    "brk_null": None,
    "neg": rows({"v": -5}),
    "flt": rows({"v": 1.5e-7}),
    "obj": rows({"doc": {"a": "it's", "b": [1, 2]}}),
}


def sql(text: str, **kw: Any) -> str:
    kw.setdefault("results", RESULTS)
    kw.setdefault("vars", {})
    kw.setdefault("instance_id", "inst-1")
    kw.setdefault("label", None)
    return substitute(text, mode="sql", **kw)


def raw(text: str, **kw: Any) -> str:
    kw.setdefault("results", RESULTS)
    kw.setdefault("vars", {})
    kw.setdefault("instance_id", "inst-1")
    kw.setdefault("label", None)
    return substitute(text, mode="raw", **kw)


# -- pass 1 ------------------------------------------------------------------------------


def test_sys_vars():
    assert raw("{sys_instance_id}/{sys_label}", label="nightly") == "inst-1/nightly"
    assert raw("[{sys_label}]") == "[]"
    assert sql("select '{sys_instance_id}'") == "select 'inst-1'"


def test_sys_vars_win_over_user_vars():
    assert raw("{sys_label}", vars={"sys_label": "mine"}, label="L") == "L"


def test_user_vars_raw_in_both_modes():
    v = {"tbl": "public.t", "q": "it's"}
    assert sql("select * from {tbl} where x = '{q}'", vars=v) == (
        "select * from public.t where x = 'it's'"
    )
    assert raw("{q}", vars=v) == "it's"


def test_unknown_braces_kept():
    assert raw('{"a": 1, "b": {nope}}', vars={"x": "y"}) == '{"a": 1, "b": {nope}}'
    assert raw("{}") == "{}"


def test_pass1_not_rescanned():
    assert raw("{a}", vars={"a": "{b}", "b": "no"}) == "{b}"
    assert raw("{a}{b}", vars={"a": "{", "b": "x}"}) == "{x}"


def test_pass1_left_to_right():
    assert raw("{a}-{a}-{b}", vars={"a": "1", "b": "2"}) == "1-1-2"


def test_var_may_hold_a_ref_pass2_runs_after_pass1():
    assert sql("select {r}", vars={"r": "$tot"}) == "select 7"


# -- pass 2: scalar refs -----------------------------------------------------------------


def test_first_column_first_row():
    assert sql("select $total + 1") == "select 42 + 1"
    assert raw("$total") == "42"


def test_first_column_uses_columns_order():
    r = {"rows": [{"a": 1, "b": 2}], "row_count": 1, "columns": ["b", "a"]}
    assert sql("$r", results={"r": r}) == "2"
    # without "columns" the first key wins
    r2 = {"rows": [{"a": 1, "b": 2}], "row_count": 1}
    assert sql("$r", results={"r": r2}) == "1"


def test_longest_name_first_and_identifier_boundary():
    assert sql("$total $tot $totals $tot_x") == "42 7 $totals $tot_x"


def test_name_ending_before_dollar_is_not_a_ref():
    # $tag$ is a dollar-quote tag in PostgreSQL
    assert sql("select $tot$ body $tot$") == "select $tot$ body $tot$"


def test_unregistered_names_untouched():
    assert sql("select $1, $later, $$x$$, $") == "select $1, $later, $$x$$, $"


def test_strict_fails_on_no_rows():
    with pytest.raises(SubstitutionError, match=r"\$empty: result 'empty' has no rows"):
        sql("select $empty")
    with pytest.raises(SubstitutionError, match="no rows"):
        raw("$empty.x")


def test_strict_fails_on_null():
    with pytest.raises(SubstitutionError, match=r"\$nul: .*null.*\$nul\?"):
        sql("select $nul")
    with pytest.raises(SubstitutionError, match=r"\$nul\.v: column 'v'"):
        sql("select $nul.v")


def test_optional_null_and_no_rows():
    assert sql("select $nul?") == "select NULL"
    assert raw("$nul?") == "null"
    assert sql("select $empty?, $empty.x?") == "select NULL, NULL"
    assert raw("$nul.v?") == "null"
    assert sql("select $nul.w?") == "select 1"


def test_substitution_error_is_a_step_error():
    with pytest.raises(StepError):
        sql("$empty")


def test_named_column():
    assert sql("select $total.label, $total.sum") == "select 'x', 42"
    assert raw("$total.label/$total.sum") == "x/42"


def test_dot_not_followed_by_identifier():
    assert raw("total: $total.") == "total: 42."
    assert sql("$total.5") == "42.5"


def test_missing_column_fails_naming_what_the_result_has():
    # in SQL mode too (#18): kept as written it could only be a syntax error at "$"
    for text in ("select $total.nope", "select $total.nope?"):
        with pytest.raises(
            SubstitutionError,
            match=r"\$total\.nope\??: result 'total' has no "
            r"column 'nope' \(its columns: sum, label\)",
        ):
            sql(text)
    with pytest.raises(
        SubstitutionError, match=r"\$total\.nope: result 'total' has no column 'nope'"
    ):
        raw("$total.nope")
    with pytest.raises(SubstitutionError, match="no column"):
        raw("$total.nope?")


def test_sql_quoting():
    assert sql("select $name") == "select 'O''Brien'"
    assert sql("select $obj") == """select '{"a":"it''s","b":[1,2]}'"""
    assert sql("select $tot") == "select 7"


def test_negative_numbers_parenthesised():
    assert sql("select 10-$neg") == "select 10-(-5)"
    assert raw("$neg") == "-5"


def test_floats():
    # a fraction or exponent from a result is kept exactly, as jsonb stores it (numeric text)
    assert sql("select $flt") == "select 0.00000015"
    assert raw("$flt") == "0.00000015"
    # a Python float (never one parsed from a result) keeps its shortest exact spelling
    assert sql("select $r", results={"r": 1.5e-7}) == "select 1.5e-07"
    assert raw("$r", results={"r": 1.5e-7}) == "1.5e-7"  # orjson's JSON spelling


def test_non_finite_floats_sql():
    r = {"r": {"rows": [{"a": float("nan"), "b": float("inf"), "c": float("-inf")}]}}
    assert sql("$r.a $r.b $r.c", results=r) == (
        "'NaN'::float8 'Infinity'::float8 '-Infinity'::float8"
    )


def test_bools():
    assert sql("$multi.b") == "true"
    assert raw("$http.ok") == "true"


def test_big_ints_exact():
    r = {"r": {"rows": [{"a": 10**30}]}, "o": {"x": [10**30]}}
    assert sql("$r", results=r) == str(10**30)
    assert raw("$o", results=r) == '{"x":[' + str(10**30) + "]}"


def test_numerics_keep_every_digit_and_their_scale():
    # rows as the worker parses them: fractions, exponents and big integers exact (Decimal)
    r = {
        "r": sql_envelope(
            [
                '{"n": 12345678901234567890.123456789, "m": 12.50, "neg": -0.50,'
                ' "tiny": 1e-30, "big": 123456789012345678901234567890,'
                ' "nan": "NaN"}'
            ]
        )
    }
    assert sql("select $r.n, $r.m", results=r) == "select 12345678901234567890.123456789, 12.50"
    assert sql("select 1-$r.neg", results=r) == "select 1-(-0.50)"
    assert sql("select $r.tiny", results=r) == "select 0." + "0" * 29 + "1"
    assert sql("select $r.big", results=r) == "select 123456789012345678901234567890"
    assert sql("select $r.nan", results=r) == "select 'NaN'"  # PostgreSQL's NaN is a string
    assert (
        raw('{"m": $r.m, "n": $r.n}', results=r)
        == '{"m": 12.50, "n": 12345678901234567890.123456789}'
    )
    assert raw("$r.*", results=r).startswith('[{"n":12345678901234567890.123456789,"m":12.50,')
    assert sql("$r.*", results=r).startswith(
        "(VALUES (12345678901234567890.123456789,12.50,(-0.50),"
    )
    # a Decimal NaN/Infinity (not parsed from JSON, which writes them as strings) still works
    d = {"d": {"rows": [{"a": Decimal("NaN"), "b": Decimal("-Infinity")}]}}
    assert sql("$d.a $d.b", results=d) == "'NaN'::numeric '-Infinity'::numeric"


def test_a_number_beyond_numeric_fails_its_reference():
    r = {"r": {"rows": [{"n": Decimal("1e999999")}]}}
    with pytest.raises(SubstitutionError, match=r"\$r\.n: the number 1E\+999999 is beyond"):
        sql("select $r.n", results=r)
    with pytest.raises(SubstitutionError, match=r"\$r\.n: the number 1E\+999999 is beyond"):
        raw("$r.n", results=r)


def test_rows_shaped_values_with_odd_columns():
    # a break value shaped like rows: columns that are not names are not used to pick the
    # first column, and $r.* refuses them (it needs names)
    r = {"r": {"rows": [{"a": 1}], "columns": [[1]]}}
    assert sql("select $r", results=r) == "select 1"
    with pytest.raises(SubstitutionError, match=r"\$r\.\*: result 'r' has a malformed columns"):
        sql("select * from $r.*", results=r)


def test_raw_mode_strings_unquoted_objects_json():
    assert raw("$name") == "O'Brien"
    assert raw("$obj") == '{"a":"it\'s","b":[1,2]}'


# -- non-row results ---------------------------------------------------------------------


def test_non_row_whole_value():
    assert raw("$http") == orjson.dumps(RESULTS["http"]).decode()
    assert sql("$http") == sql_literal(orjson.dumps(RESULTS["http"]).decode())
    assert raw("$joined") == orjson.dumps(RESULTS["joined"]).decode()
    assert raw("$brk") == "done"
    assert sql("$brk") == "'done'"
    assert sql("$brk_num") == "42"


def test_non_row_null_whole_value():
    with pytest.raises(SubstitutionError, match="brk_null"):
        raw("$brk_null")
    assert sql("$brk_null?") == "NULL"


def test_non_row_top_level_field():
    assert raw("$http.status $http.body") == "200 hello"
    assert sql("$http.body") == "'hello'"
    assert raw("$sig.data") == '{"x":1}'
    assert sql("$sig.timed_out") == "false"
    assert sql("$http.none?") == "NULL"
    with pytest.raises(SubstitutionError, match="field 'none'"):
        raw("$http.none")


def test_non_row_missing_field():
    with pytest.raises(SubstitutionError, match=r"no column 'nope' \(its fields: status, body"):
        sql("$http.nope")
    with pytest.raises(SubstitutionError, match="no column 'nope'"):
        raw("$http.nope")
    # a field of an array or a string does not exist either
    with pytest.raises(
        SubstitutionError, match=r"\$joined\.a: .* \(it is an array, not an object\)"
    ):
        sql("$joined.a")
    with pytest.raises(SubstitutionError, match=r"\$brk\.a: .* \(it is a string, not an object\)"):
        sql("$brk.a")


def test_rows_key_that_is_not_a_list_is_not_a_row_set():
    r = {"r": {"rows": 5, "x": "y"}}
    assert raw("$r.rows $r.x", results=r) == "5 y"


# -- $n.* --------------------------------------------------------------------------------


def test_star_sql():
    out = sql("select * from $multi.*")
    assert out == (
        "select * from (VALUES "
        """(1,'a'::text,'{"k":[1]}'::jsonb,true,NULL),"""
        "(2,'b''c'::text,'[]'::jsonb,false,2.5)"
        ') AS "multi"("id","s","j","b","z")'
    )


def test_star_empty():
    assert sql("select * from $empty.*") == 'select * from (SELECT NULL WHERE false) AS "empty"'
    assert raw("$empty.*") == "[]"


def test_star_raw():
    assert raw("$multi.*") == (
        '[{"id":1,"s":"a","j":{"k":[1]},"b":true,"z":null},'
        '{"id":2,"s":"b\'c","j":[],"b":false,"z":2.5}]'
    )


def test_star_column_order_from_columns():
    r = {"r": {"rows": [{"a": 1, "b": 2}], "row_count": 1, "columns": ["b", "a"]}}
    assert sql("$r.*", results=r) == '(VALUES (2,1)) AS "r"("b","a")'


def test_star_quotes_identifiers():
    r = {"r": rows({'we"ird': 1})}
    assert sql("$r.*", results=r) == '(VALUES (1)) AS "r"("we""ird")'


def test_star_rows_without_columns():
    r = {"r": rows({}, {})}
    assert sql("$r.*", results=r) == '(SELECT FROM generate_series(1, 2)) AS "r"'


def test_star_row_cap():
    big = {"big": rows(*({"i": i} for i in range(11)))}
    assert sql("$big.*", results=big, max_star_rows=11).startswith("(VALUES (0),(1)")
    with pytest.raises(
        SubstitutionError, match=r"\$big\.\*: result 'big' has 11 rows, more than the 10"
    ):
        sql("$big.*", results=big, max_star_rows=10)
    with pytest.raises(SubstitutionError, match="more than"):
        raw("$big.*", results=big, max_star_rows=10)


def test_star_default_cap_is_10000():
    big = {"big": {"rows": [{"i": 1}] * 10_001, "row_count": 10_001, "columns": ["i"]}}
    with pytest.raises(SubstitutionError, match="10001 rows, more than the 10000"):
        sql("$big.*", results=big)


def test_star_on_non_row_result_fails():
    with pytest.raises(SubstitutionError, match="not a row set"):
        sql("$http.*")


def test_star_question_mark_is_literal():
    assert raw("$empty.*?") == "[]?"


# -- injection ---------------------------------------------------------------------------

HOSTILE = [
    "'; drop table t; --",
    "\\'; drop table t; --",
    "a\\",
    "$$; drop table t; $$",
    "$tag$ x",
    "*/ drop table t; /*",
    "x\ndrop table t; --",
    "x\rdrop",
    "ünïcødé ✓ 𝄞 \u2028",
    "''''",
    "\\\\'",
    "E'x'",
    "\t\x01\x1f\x7f",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_strings_are_one_inert_literal(value):
    out = sql("select $v", results={"v": rows({"v": value})})
    lit = out.removeprefix("select ")
    assert decode_literal(lit) == value
    # nothing that ends a dollar quote, a line comment or a block comment
    assert "$" not in lit
    assert "\n" not in lit
    assert "\r" not in lit
    assert "*" not in lit


def test_huge_string():
    value = ("ab'c\\$" * 200_000) + "\n"
    out = sql("select $v", results={"v": rows({"v": value})})
    assert decode_literal(out.removeprefix("select ")) == value


def test_values_are_not_rescanned():
    r = {"a": rows({"v": "$b {x}"}), "b": rows({"v": "pwned"})}
    assert raw("$a $b", results=r, vars={"x": "y"}) == "$b {x} pwned"
    assert sql("$a", results=r) == "E'\\x24b {x}'"


def test_nul_rejected_in_sql_mode():
    with pytest.raises(SubstitutionError, match=r"\$v: .*NUL"):
        sql("select $v", results={"v": rows({"x": "a\x00b"})})
    # inside JSON the NUL is an escape sequence, which is fine
    assert sql("$v", results={"v": {"x": "a\x00b"}}) == 'E\'{"x":"a\\\\u0000b"}\''


def test_dollar_body_stays_closed():
    out = sql("do $$ begin perform $v; end $$", results={"v": rows({"v": "$$; drop table t; --"})})
    assert out.count("$$") == 2


def decode_literal(lit: str) -> str:
    """Decode one PostgreSQL string literal as produced by sql_literal (strict)."""
    if lit.startswith("E'"):
        assert lit.endswith("'")
        body, out, i = lit[2:-1], [], 0
        while i < len(body):
            c = body[i]
            if c == "\\":
                n = body[i + 1]
                if n == "\\":
                    out.append("\\")
                    i += 2
                elif n == "x":
                    out.append(chr(int(body[i + 2 : i + 4], 16)))
                    i += 4
                else:  # pragma: no cover
                    raise AssertionError(f"unexpected escape in {lit!r}")
            elif c == "'":
                assert body[i + 1] == "'", lit
                out.append("'")
                i += 2
            else:
                out.append(c)
                i += 1
        return "".join(out)
    assert lit.startswith("'"), lit
    assert lit.endswith("'"), lit
    body = lit[1:-1]
    assert "\\" not in body
    assert body.replace("''", "").count("'") == 0, lit
    return body.replace("''", "'")


# -- substitute_whole_value --------------------------------------------------------------


def whole(text: str, **kw: Any) -> str:
    kw.setdefault("results", RESULTS)
    kw.setdefault("vars", {"v": "aGk="})
    kw.setdefault("instance_id", "inst-1")
    kw.setdefault("label", None)
    return substitute_whole_value(text, **kw)


def test_whole_value_literal():
    assert whole("aGVsbG8=\n") == "aGVsbG8=\n"


def test_whole_value_refs():
    assert whole("$http.body") == "hello"
    assert whole(" $brk ") == "done"
    assert whole("$nul.v?") == "null"
    assert whole("$total") == "42"
    assert whole("{v}") == "aGk="
    assert whole("{sys_instance_id}") == "inst-1"


@pytest.mark.parametrize(
    "text",
    [
        "x$http.body",
        "$http.body$http.body",
        "a{v}",
        "{v}{v}",
        "$multi.*",
        "$nope",
        "{",
        "$",
        "{nope}",
        "$http.body x",
    ],
)
def test_whole_value_rejects(text):
    with pytest.raises(SubstitutionError, match="whole-value reference"):
        whole(text)


def test_whole_value_ref_errors_still_name_the_ref():
    with pytest.raises(SubstitutionError, match=r"\$empty: result 'empty' has no rows"):
        whole("$empty")
    with pytest.raises(SubstitutionError, match="no column"):
        whole("$http.nope")


def test_no_results_no_vars_fast_path():
    assert (
        substitute("select $x {y}", mode="sql", results={}, vars={}, instance_id="i", label=None)
        == "select $x {y}"
    )
