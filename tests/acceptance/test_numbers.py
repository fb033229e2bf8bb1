"""End-to-end: numbers keep every digit and their scale through a real `pgdurable serve`.

A step's rows travel as PostgreSQL's ``to_json`` text into the worker, are stored in
``df.nodes`` (jsonb), substituted into later steps (``$a.n``, ``$a.*``, raw mode in
``df.break``), judged as conditions and printed by the CLI. Each hop must keep what
PostgreSQL's jsonb keeps: every digit and the scale (``12.50`` stays ``12.50``).
Runs on both servers (the ``db`` fixture is parametrised over them).
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from click.testing import CliRunner

from pgdurable.cli import main

pytestmark = pytest.mark.timeout(180)

# one row of every hard number: past 17 digits, a scale with a trailing zero, beyond a double
# (1e400), below it (1e-400), NaN and ±Infinity (strings in JSON), the int8 bounds, 1000+1000
# digits, numeric's largest magnitude, floats in exponent form, a zero with a scale
FIRST = (
    "select 12345678901234567890.123456789::numeric as n, 12.50::numeric as m,"
    " 1e400::numeric as huge, 1e-400::numeric as tiny, 'NaN'::numeric as nan,"
    " 'Infinity'::numeric as inf, '-Infinity'::float8 as ninf,"
    " 9223372036854775807::int8 as big, (-9223372036854775807 - 1)::int8 as small,"
    " (repeat('9', 1000) || '.' || repeat('1', 1000))::numeric as long,"
    " 9.99e131071::numeric as vast, 1.5e300::float8 as f, 0.1::float4 as f4,"
    " 0.0000000::numeric as z, -0.50::numeric as neg"
)
# what a later step sees through $a.col: the same texts PostgreSQL gives the originals
SECOND = (
    "select $a.n::text as n, $a.m::text as m, $a.huge::text as huge,"
    " $a.tiny::text as tiny, $a.nan::numeric::text as nan, $a.inf::numeric::text as inf,"
    " $a.ninf::float8::text as ninf, $a.big::text as big, $a.small::text as small,"
    " md5($a.long::text) as long, md5($a.vast::text) as vast, $a.f::float8::text as f,"
    " $a.f4::float4::text as f4, $a.z::text as z, $a.neg::text as neg,"
    " (select string_agg(m::text || '/' || n::text, ',') from $a.*) as star"
)
EXPECTED = (
    "select 12345678901234567890.123456789::numeric::text as n, 12.50::numeric::text as m,"
    " 1e400::numeric::text as huge, 1e-400::numeric::text as tiny, 'NaN' as nan,"
    " 'Infinity' as inf, '-Infinity' as ninf, '9223372036854775807' as big,"
    " '-9223372036854775808' as small,"
    " md5((repeat('9', 1000) || '.' || repeat('1', 1000))::numeric::text) as long,"
    " md5(9.99e131071::numeric::text) as vast, 1.5e300::float8::text as f,"
    " 0.1::float4::text as f4, '0.0000000' as z, '-0.50' as neg,"
    " '12.50/12345678901234567890.123456789' as star"
)


def _sql(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@pytest.fixture
def running(db, serve_factory, tenant):
    s = serve_factory(db)
    s.wait_workers(2)
    return s


def _run(db, role, expr, timeout=90):
    with db.connect(role) as conn:
        iid = conn.execute(f"select df.start({expr})").fetchone()[0]
        status = conn.execute("select df.await_instance(%s, %s)", (iid, timeout)).fetchone()[0]
        error = conn.execute("select df.error(%s)::text", (iid,)).fetchone()[0]
    assert status == "completed", error
    return iid


def _cli(dsn, *args):
    res = CliRunner().invoke(main, [*args, "--dsn", dsn], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_numbers_keep_every_digit_end_to_end(db, running, tenant):
    expr = f"df.sql({_sql(FIRST)}) |=> 'a' ~> df.sql({_sql(SECOND)})"
    iid = _run(db, tenant, expr)
    with db.connect(tenant) as conn:
        expected = conn.execute(f"select to_jsonb(r)::text from ({EXPECTED}) r").fetchone()[0]
        # the substituted step saw exactly PostgreSQL's own texts
        got = conn.execute("select (df.result(%s)::jsonb -> 'rows' -> 0)::text", (iid,)).fetchone()[
            0
        ]
        assert json.loads(got) == json.loads(expected)
        # the first step's stored row is what PostgreSQL's to_jsonb makes of it, digit for
        # digit and scale for scale (jsonb text keeps 12.50)
        same, stored = conn.execute(
            f"select (n.result::jsonb -> 'rows' -> 0)::text = to_jsonb(r)::text,"
            f"       left((n.result::jsonb -> 'rows' -> 0 ->> 'n'), 40)"
            f"  from df.instance_nodes(%s) n, ({FIRST}) r"
            f" where n.node_type = 'SQL' and n.query = %s",
            (iid, FIRST),
        ).fetchone()
        assert same, stored
        assert stored == "12345678901234567890.123456789"

    # the CLI prints the same digits, in its table and in --json
    dsn = db.dsn_as(tenant)
    out = _cli(dsn, "result", iid)
    assert '"n":"12345678901234567890.123456789"' in out.replace(" ", "")
    assert '"m":"12.50"' in out.replace(" ", "")
    data = json.loads(_cli(dsn, "result", iid, "--json"), parse_float=Decimal)
    assert data["result"]["rows"][0]["m"] == "12.50"


def test_first_step_numbers_through_cli_and_instance_nodes(db, running, tenant):
    first = (
        "select 12345678901234567890.123456789::numeric as n, 12.50::numeric as m,"
        " 1e-400::numeric as tiny, 123456789012345678901234567890::numeric as wide"
    )
    iid = _run(db, tenant, f"df.sql({_sql(first)})")
    with db.connect(tenant) as conn:
        result = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]
        node = conn.execute(
            "select result from df.instance_nodes(%s) where node_type = 'SQL'", (iid,)
        ).fetchone()[0]
    for text in (result, node):
        row = json.loads(text, parse_float=Decimal, parse_int=Decimal)["rows"][0]
        assert str(row["n"]) == "12345678901234567890.123456789"
        assert str(row["m"]) == "12.50"
        assert row["tiny"] == Decimal("1e-400")
        assert row["tiny"].as_tuple().exponent == -400
        assert str(row["wide"]) == "123456789012345678901234567890"
    dsn = db.dsn_as(tenant)
    for out in (_cli(dsn, "result", iid), _cli(dsn, "result", iid, "--json")):
        compact = out.replace(" ", "")
        assert '"n":12345678901234567890.123456789' in compact, out
        assert '"m":12.50' in compact, out
        assert '"wide":123456789012345678901234567890' in compact, out
        assert '"tiny":0.' + "0" * 399 + "1" in compact, out[:300]
    listed = json.loads(_cli(dsn, "list", "--json"), parse_float=Decimal)
    output = next(i["output"] for i in listed["instances"] if i["instance_id"] == iid)
    assert str(output["rows"][0]["m"]) == "12.50"


def test_huge_numeric_alone_completes_at_once(db, running, tenant):
    iid = _run(db, tenant, "df.sql('select 1e400::numeric as huge, 12.50 as m')", timeout=30)
    with db.connect(tenant) as conn:
        same = conn.execute(
            "select (df.result(%s)::jsonb -> 'rows' -> 0)::text = "
            "to_jsonb(r)::text from (select 1e400::numeric as huge, 12.50 as m) r",
            (iid,),
        ).fetchone()[0]
    assert same


def test_conditions_and_raw_substitution_keep_digits(db, running, tenant):
    with db.connect() as conn:
        conn.execute(f"alter database {db.name} set pg_durable.loop_min_interval_ms = 0")
    # 1e-400 is not zero (a float would say it is); the break value is built in raw mode
    expr = (
        "df.sql('select 12345678901234567890.123456789::numeric as n, 12.50 as m') |=> 'a'"
        " ~> df.if(df.sql('select 1e-400::numeric'),"
        '          df.loop(df.break(\'{"n": $a.n, "m": $a.m, "rows": $a.*}\')),'
        "          df.sql('select ''float said zero'' as wrong'))"
    )
    iid = _run(db, tenant, expr)
    with db.connect(tenant) as conn:
        text = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]
    compact = text.replace(" ", "")
    assert compact.startswith('{"m":12.50,"n":12345678901234567890.123456789'), text
    assert '"rows":[{"m":12.50,"n":12345678901234567890.123456789}]' in compact, text


def test_named_composite_with_exact_numbers(db, running, tenant):
    # a named JOIN's value (its branches' results) is stored as one named result: encoded
    # from Python values, not from a leaf's bytes
    expr = (
        "(df.sql('select 12.50::numeric as m') & df.sql('select 1e400::numeric as h'))"
        " |=> 'j' ~> df.sql('select $j::jsonb -> 0 -> ''rows'' -> 0 ->> ''m'' as m,"
        " length($j::jsonb -> 1 -> ''rows'' -> 0 ->> ''h'') as h')"
    )
    iid = _run(db, tenant, expr, timeout=30)
    with db.connect(tenant) as conn:
        text = conn.execute("select df.result(%s)", (iid,)).fetchone()[0]
    assert json.loads(text)["rows"] == [{"m": "12.50", "h": 401}]


def test_a_number_jsonb_cannot_store_fails_its_step_saying_so(db, running, tenant):
    # a json column keeps its text: 1e999999 is beyond numeric, so jsonb (what results are
    # stored as) cannot hold it; PostgreSQL's own to_jsonb fails on it too
    with db.connect(tenant) as conn:
        iid = conn.execute("select df.start('select ''{\"a\": 1e999999}''::json as j')").fetchone()[
            0
        ]
        status = conn.execute("select df.await_instance(%s, 30)", (iid,)).fetchone()[0]
        err = conn.execute("select df.error(%s)", (iid,)).fetchone()[0]
    assert status == "failed"
    assert err["error"].startswith(
        "step result cannot be stored: the number 1E+999999 is "
        "beyond the range of PostgreSQL's numeric"
    ), err
    assert "internal error" not in running.log()
