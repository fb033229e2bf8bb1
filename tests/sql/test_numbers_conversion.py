"""Property tests of result conversion against PostgreSQL itself (docs/decisions.md D8;
issue 12 item 1).

A SQL step's rows reach the worker as PostgreSQL's ``to_json(record)`` text; the worker parses
them (:func:`pgdurable.values.sql_envelope`) and encodes them again for ``df.nodes``
(:func:`pgdurable.values.json_bytes`), substitutes them into later steps
(:mod:`pgdurable.subst`) and judges them as conditions (:func:`pgdurable.values.truthy`).
Here, on both servers:

- every built-in base type PostgreSQL can take a literal of (and arrays, ranges, multiranges,
  composites, domains, enums of them) converts without an error, and what we store is what
  PostgreSQL's own ``to_jsonb`` makes of the row, text for text (jsonb's text shows a number's
  digits and scale, ``12.50`` stays ``12.50``);
- random numerics (up to 1000 digits, exponents across numeric's whole range, NaN and
  ±Infinity) and random float8s do the same, and ``$r.n`` substituted into SQL gives back
  PostgreSQL's own text of the number, and conditions judge them as ``n <> 0`` does.

A type the server has that is neither sampled here nor listed as impossible to write fails
:func:`test_every_base_type_is_covered`, so a new PostgreSQL version cannot slip past.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgdurable.subst import substitute
from pgdurable.values import json_text, sql_envelope, truthy

Conn = psycopg.Connection[Any]

# Literals per base type (SQL expressions), edge cases first.
SAMPLES: dict[str, list[str]] = {
    "numeric": [
        "12.50",
        "-0.000",
        "'NaN'",
        "'Infinity'",
        "'-Infinity'",
        "1e400",
        "1e-400",
        "12345678901234567890.123456789",
        "repeat('9', 1000) || '.' || repeat('1', 1000)",
        "'9.99e131071'",
        "'1e-16383'",
        "0",
    ],
    "int2": ["-32768", "32767"],
    "int4": ["-2147483648", "2147483647"],
    "int8": ["-9223372036854775808", "9223372036854775807", "0"],
    "float4": ["'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "'1e-45'", "'3.4028235e38'", "'0.1'"],
    "float8": [
        "'NaN'",
        "'-Infinity'",
        "'-0'",
        "'1.5e300'",
        "'5e-324'",
        "'0.1'",
        "'1.7976931348623157e308'",
        "'123456789012345678'",
    ],
    "money": ["'-92233720368547758.08'", "'12.50'"],
    "text": ["E'a\\tb\\u0001\"\\\\ü''x'", "''", "'12.50'", "'{\"a\": 1.50}'"],
    "varchar": ["'x'"],
    "bpchar": ["'ab '"],
    "char": ["'x'"],
    "name": ["'a name'"],
    "bytea": ["'\\x00ff'", "''"],
    "bool": ["true", "false"],
    "date": ["'infinity'", "'-infinity'", "'4713-01-01 BC'", "'5874897-12-31'", "'2024-02-29'"],
    "time": ["'24:00'", "'13:14:15.123456'"],
    "timetz": ["'13:14:15.5+05:30'"],
    "timestamp": ["'infinity'", "'294276-12-31 23:59:59.999999'", "'4713-01-01 00:00 BC'"],
    "timestamptz": ["'-infinity'", "'2024-01-01 10:00:00.123+00'"],
    "interval": ["'-178000000 years'", "'1 day 00:00:00.000001'", "'P1Y2M3DT4H5M6.5S'"],
    "uuid": ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"],
    "json": [
        '\'{"a": 1.0e+2, "b": [1E-3, 12.50], "a": 12345678901234567890123}\'',
        "'[1e400, -0, 0.0000001, \"NaN\"]'",
        "'\"x\"'",
        "'null'",
        "'{}'",
        '\'  {"n" :  12.50 , "s": "a:1.5,"}  \'',
    ],
    "jsonb": [
        '\'{"a": 1.0e+2, "b": [1E-3, 12.50], "c": 12345678901234567890123}\'',
        "'[1e400, 1e-400]'",
        "'12.50'",
    ],
    "jsonpath": ["'$.a[*] ? (@ > 1.50)'"],
    "inet": ["'192.168.0.1/24'", "'::1'"],
    "cidr": ["'10.0.0.0/8'"],
    "macaddr": ["'08:00:2b:01:02:03'"],
    "macaddr8": ["'08:00:2b:01:02:03:04:05'"],
    "bit": ["B'101'"],
    "varbit": ["B'10101'"],
    "tsvector": ["'a:1 fat:2 cat:3'"],
    "tsquery": ["'fat & (rat | cat)'"],
    "xml": ["'<a b=\"1.50\">12.50</a>'"],
    "point": ["'(1.5,2.50)'"],
    "line": ["'{1,2,3}'"],
    "lseg": ["'[(0,0),(1,1.5)]'"],
    "box": ["'(1,1),(0,0)'"],
    "path": ["'[(0,0),(1,1),(2,0)]'"],
    "polygon": ["'((0,0),(1,1),(2,0))'"],
    "circle": ["'<(0,0),1.5>'"],
    "pg_lsn": ["'16/B374D848'"],
    "oid": ["4294967295"],
    "xid": ["'4294967295'"],
    "xid8": ["'18446744073709551615'"],
    "cid": ["'3'"],
    "tid": ["'(4294967295,65535)'"],
    "pg_snapshot": ["'10:20:10,14,15'"],
    "txid_snapshot": ["'10:20:10,14,15'"],
    "aclitem": ["'postgres=arwdDxt/postgres'"],
    "refcursor": ["'cur'"],
    "regclass": ["'pg_class'"],
    "regtype": ["'numeric'"],
    "regproc": ["'now'"],
    "regprocedure": ["'now()'"],
    "regoper": ["'||/'"],
    "regoperator": ["'+(int4,int4)'"],
    "regnamespace": ["'pg_catalog'"],
    "regrole": ["'postgres'"],
    "regconfig": ["'english'"],
    "regdictionary": ["'simple'"],
    "regcollation": ["'\"C\"'"],
}
# Base types no literal can make (no input function, or internal to the planner/indexes).
UNWRITABLE = {
    "gtsvector",
    "pg_node_tree",
    "pg_ndistinct",
    "pg_dependencies",
    "pg_mcv_list",
    "pg_brin_bloom_summary",
    "pg_brin_minmax_multi_summary",
}
RANGES = {
    "int4range": "'[1,10)'",
    "int8range": "'[-9223372036854775808,9223372036854775807)'",
    "numrange": "'[12.50,1e400]'",
    "daterange": "'[2024-01-01,infinity)'",
    "tsrange": "'[2024-01-01 10:00,2024-01-02)'",
    "tstzrange": "'(,2024-01-01 10:00+00]'",
}

HYP = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def _has_xml(tx: Conn) -> bool:
    try:
        tx.execute("savepoint x")
        tx.execute("select '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:
        tx.execute("rollback to savepoint x")
        return False
    tx.execute("release savepoint x")
    return True


def _rows_through_pgdurable(
    tx: Conn, select: str, params: tuple[Any, ...] = ()
) -> list[tuple[str, str]]:
    """(what pgdurable stores, what to_jsonb says) per row of ``select``, both as jsonb text.

    The row goes the worker's way: to_json(record) text, sql_envelope, json_text; PostgreSQL
    then reads what we wrote as jsonb (as the checkpoint does)."""
    # q: no sampled column is named so (a column named like the alias would be used instead)
    pairs = tx.execute(
        f"select to_json(q)::text, to_jsonb(q)::text from ({select}) q", params
    ).fetchall()
    envs = [sql_envelope([to_json]) for to_json, _ in pairs]
    ours = [json_text(env["rows"][0]) for env in envs]
    stored = tx.execute(
        "select t::jsonb::text from unnest(%s::text[]) with ordinality u(t, i) order by i", (ours,)
    ).fetchall()
    for env in envs:
        # and the other places a result goes: a condition, substitution in both modes (the
        # SQL form runs: every cell is a literal PostgreSQL accepts)
        truthy(env)
        for ref in ("$r?", "$r.*"):
            substitute(ref, mode="raw", results={"r": env}, vars={}, instance_id="i", label=None)
        star = substitute(
            "select count(*) from $r.*",
            mode="sql",
            results={"r": env},
            vars={},
            instance_id="i",
            label=None,
        )
        assert tx.execute(star).fetchone()[0] == 1
    return [(s[0], p[1]) for s, p in zip(stored, pairs, strict=True)]


def _check(tx: Conn, select: str, params: tuple[Any, ...] = ()) -> None:
    for stored, expected in _rows_through_pgdurable(tx, select, params):
        assert stored == expected, select


def _types(tx: Conn) -> list[str]:
    return [
        r[0]
        for r in tx.execute(
            "select typname from pg_type t join pg_namespace n on n.oid = t.typnamespace "
            "where nspname = 'pg_catalog' and typtype = 'b' and typcategory <> 'A' "
            "and typisdefined order by 1"
        ).fetchall()
    ]


def test_every_base_type_is_covered(tx: Conn) -> None:
    missing = set(_types(tx)) - set(SAMPLES) - UNWRITABLE
    assert not missing, f"base types without a sample here: {sorted(missing)}"


def test_every_base_type_converts_as_to_jsonb(tx: Conn) -> None:
    xml = _has_xml(tx)
    present = set(_types(tx))
    for typ, literals in SAMPLES.items():
        if typ not in present or (typ == "xml" and not xml):
            continue
        cols = ", ".join(f"({lit})::pg_catalog.{typ} as c{i}" for i, lit in enumerate(literals))
        _check(tx, f"select {cols}")
        # arrays of it: one and two dimensions, with a NULL
        first = f"({literals[0]})::pg_catalog.{typ}"
        last = f"({literals[-1]})::pg_catalog.{typ}"
        _check(
            tx,
            f"select array[{first}, null, {last}] as a, array[array[{first}], array[{last}]] as b",
        )


def test_ranges_composites_domains_and_enums_convert_as_to_jsonb(tx: Conn) -> None:
    for typ, lit in RANGES.items():
        _check(tx, f"select {lit}::{typ} as r, array[{lit}::{typ}] as a")
    if tx.info.server_version >= 140000:  # multiranges
        _check(
            tx,
            "select '{[12.50,13), [1e400,1e401]}'::nummultirange as m, "
            "'{[1,2)}'::int4multirange as i",
        )
    tx.execute("create type pg_temp.mood as enum ('ok', '12.50')")
    tx.execute("create domain pg_temp.money2 as numeric(20, 2) check (value >= 0)")
    tx.execute("create type pg_temp.pair as (n numeric, t text, a numeric[])")
    _check(
        tx,
        "select '12.50'::pg_temp.mood as e, 7::pg_temp.money2 as d, "
        "row(12.50, 'x', array[1e-400, 12345678901234567890.5])::pg_temp.pair as p, "
        "row(row(12.50, 'NaN'::numeric), 1e400) as anon, "
        "array[row(0.10, null, null)::pg_temp.pair] as ps",
    )
    # a table's row, with every column NULL
    _check(tx, "select t from (select null::numeric as n, null::jsonb as j) t")


# -- random numerics -----------------------------------------------------------------------


@st.composite
def numeric_texts(draw: st.DrawFn) -> str:
    """Text of a numeric PostgreSQL accepts: NaN, ±Infinity, or sign + digits + exponent,
    anywhere in numeric's range (at most 131072 digits before the point, 16383 after)."""
    kind = draw(st.sampled_from(["finite"] * 12 + ["NaN", "Infinity", "-Infinity"]))
    if kind != "finite":
        return kind
    size = draw(st.sampled_from([3, 20, 40, 1000]))
    digits = draw(st.text("0123456789", min_size=1, max_size=size))
    exp = draw(st.one_of(st.integers(-25, 25), st.integers(-16383, 131071)))
    sig = len(digits.lstrip("0"))
    exp = max(exp, -16383)
    if sig and exp + sig - 1 > 131071:
        exp = 131071 - sig + 1
    sign = draw(st.sampled_from(["", "-"]))
    point = draw(st.booleans())
    if point and exp <= 0 and -exp < len(digits):  # plain notation with a scale: 12.50
        return (
            f"{sign}{digits[: len(digits) + exp]}.{digits[len(digits) + exp :]}"
            if len(digits) + exp > 0
            else f"{sign}0.{digits}"
        )
    return f"{sign}{digits}e{exp}"


def _substituted(value: Any) -> str:
    return substitute(
        "$r.n",
        mode="sql",
        results={"r": {"rows": [{"n": value}]}},
        vars={},
        instance_id="i",
        label=None,
    )


@HYP
@given(texts=st.lists(numeric_texts(), min_size=1, max_size=12))
def test_random_numerics_round_trip(tx: Conn, texts: list[str]) -> None:
    with tx.transaction():  # a savepoint: one example's failure does not abort the next
        _numerics_round_trip(tx, texts)


def _numerics_round_trip(tx: Conn, texts: list[str]) -> None:
    rows = tx.execute(
        "select to_json(r)::text, to_jsonb(r)::text, r.n::text, "
        "case when r.n = 'NaN' then null else r.n <> 0 end "
        "from (select t::numeric as n from unnest(%s::text[]) with ordinality u(t, i) "
        "order by i) r",
        (texts,),
    ).fetchall()
    ours = [json_text(sql_envelope([r[0]])["rows"][0]) for r in rows]
    stored = tx.execute(
        "select t::jsonb::text from unnest(%s::text[]) with ordinality u(t, i) order by i", (ours,)
    ).fetchall()
    for (_, to_jsonb, _, _), (got,) in zip(rows, stored, strict=True):
        assert got == to_jsonb
    # $r.n substituted into SQL is PostgreSQL's own number, digit for digit, scale kept
    values = [sql_envelope([r[0]])["rows"][0]["n"] for r in rows]
    back = tx.execute(
        "select " + ", ".join(f"({_substituted(v)})::text" for v in values)
    ).fetchone()
    for (_, _, text, nonzero), value, got in zip(rows, values, back, strict=True):
        assert got == text
        if nonzero is not None:  # conditions: the number is judged as n <> 0
            assert truthy({"rows": [{"n": value}], "columns": ["n"]}) is nonzero
        if text not in ("NaN", "Infinity", "-Infinity"):
            assert Decimal(text) == value


@HYP
@given(data=st.data(), width=st.sampled_from([64, 32]))
def test_random_floats_round_trip(tx: Conn, data: st.DataObject, width: int) -> None:
    floats = data.draw(st.lists(st.floats(width=width), min_size=1, max_size=12))
    texts = [
        {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(repr(f), repr(f)) for f in floats
    ]
    typ = "float8" if width == 64 else "float4"
    with tx.transaction():  # a savepoint: one example's failure does not abort the next
        _check(
            tx,
            f"select t::{typ} as f from unnest(%s::text[]) with ordinality u(t, i) order by i",
            (texts,),
        )
