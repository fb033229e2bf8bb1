"""The seven DSL operators of pgdurable/sql/schema/20_operators.sql (docs/api.md "Operators", docs/api.md "NULL arguments").

PostgreSQL gives all user-defined operators one precedence level, left-associative; these
tests pin the groupings docs/api.md "Operators" documents, the mapping of each operator to its df
function, and that none of them clashes with a built-in operator on text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from pgdurable import schema
from tests.fix_sql import one

OPERATORS_SQL = Path(schema.__file__).parent / "sql" / "schema" / "20_operators.sql"

# name -> (left type, right type, df function)
OPERATORS = {
    "~>": ("text", "text", "seq"),
    "|=>": ("text", "text", "as_op"),
    "&": ("text", "text", "join"),
    "|": ("text", "text", "race"),
    "?>": ("text", "text", "if_then_op"),
    "!>": ("text", "text", "if_else_op"),
    "@>": (None, "text", "loop_op"),
}

Conn = psycopg.Connection[Any]


def same(tx: Conn, left: str, right: str) -> None:
    """Both expressions build the very same graph text."""
    a, b = one(tx, f"select ({left})::text"), one(tx, f"select ({right})::text")
    assert a is not None
    assert a == b


def fails(tx: Conn, query: str) -> str:
    with pytest.raises(errors.InvalidParameterValue) as info, tx.transaction():
        tx.execute(query)
    diag = info.value.diag
    return f"{diag.message_primary}\n{diag.message_hint or ''}"


# ---------------------------------------------------------------------------------------
# catalog


def test_operators_exist_once_and_map_to_df(tx: Conn) -> None:
    for name, (left, right, func) in OPERATORS.items():
        rows = tx.execute(
            """
            select o.oprnamespace::regnamespace::text, o.oprcode::regproc::text
            from pg_operator o
            where o.oprname = %s
              and o.oprleft = coalesce(%s::regtype, 0) and o.oprright = %s::regtype""",
            (name, left, right),
        ).fetchall()
        # exactly one: ours (no built-in shares name and operand types)
        assert len(rows) == 1, (name, rows)
        nsp, code = rows[0]
        assert code.removeprefix("df.").strip('"') == func, (name, code)
        # the test databases are installed by an administrator that is not a superuser, as
        # on a managed cloud: the operators go to public (docs/api.md "NULL arguments"; pg_catalog needs a
        # superuser, see test_operators_resolve_with_empty_search_path)
        assert nsp == "public"


def test_no_builtin_text_operator_clash(tx: Conn) -> None:
    # every operator with one of our names that accepts text or unknown is ours
    rows = tx.execute(
        """
        select o.oprname, o.oprcode::regproc::text from pg_operator o
        where o.oprname = any (%s)
          and (o.oprleft in (0, 'text'::regtype, 'unknown'::regtype)
               and o.oprright in ('text'::regtype, 'unknown'::regtype))""",
        (list(OPERATORS),),
    ).fetchall()
    assert sorted(name for name, _ in rows) == sorted(OPERATORS)
    assert all(code.startswith("df.") for _, code in rows)


def test_operators_resolve_with_empty_search_path(tx: Conn) -> None:
    # what an install by a superuser does: the operators in pg_catalog (the tx connection is
    # the cluster's superuser; rolled back after the test)
    tx.execute(
        schema.render(
            OPERATORS_SQL.read_text(), engine="pgdurable", op_schema="pg_catalog"
        ).encode()
    )
    tx.execute("set local search_path = ''")
    g = json.loads(one(tx, "select @> 'a' ~> 'b' & 'c' | 'd' |=> 'n'"))
    assert g["node_type"] == "RACE"
    assert g["result_name"] == "n"
    g = json.loads(one(tx, "select 'c' ?> 't' !> 'e'"))
    assert g["node_type"] == "IF"


@pytest.mark.parametrize("op", ["~>", "&", "|", "?>"])
def test_untyped_literals_resolve_to_text(tx: Conn, op: str) -> None:
    # '…' op '…' with two unknown literals: & and | also exist for integer/bit/inet types;
    # PostgreSQL prefers the string category, so the text operator is chosen
    text = one(tx, f"select 'select 1' {op} 'select 2'")
    assert json.loads(text)


def test_operator_file_installs_in_another_schema(tx: Conn) -> None:
    # what a non-superuser install does (public) or --operator-schema: the file is
    # parametric in @opschema@ and does not depend on pg_catalog
    tx.execute("create schema ops_elsewhere")
    tx.execute(
        schema.render(
            OPERATORS_SQL.read_text(), engine="pgdurable", op_schema="ops_elsewhere"
        ).encode()
    )
    n = one(
        tx, "select count(*) from pg_operator where oprnamespace = 'ops_elsewhere'::regnamespace"
    )
    assert n == 7
    same(tx, "'a' operator(ops_elsewhere.~>) 'b'", "df.seq('a', 'b')")


# ---------------------------------------------------------------------------------------
# each operator = its function


def test_then(tx: Conn) -> None:
    same(tx, "'select 1' ~> 'select 2'", "df.seq('select 1', 'select 2')")


def test_as(tx: Conn) -> None:
    same(tx, "'select 1' |=> 'r'", "df.as('select 1', 'r')")


def test_join(tx: Conn) -> None:
    same(tx, "'a' & 'b'", "df.join('a', 'b')")


def test_race(tx: Conn) -> None:
    same(tx, "'a' | df.sleep(5)", "df.race('a', df.sleep(5))")


def test_if_partial_and_else(tx: Conn) -> None:
    partial = json.loads(one(tx, "select 'c' ?> 't'"))
    assert partial == {
        "_partial_if": True,
        "condition": {"node_type": "SQL", "query": "c"},
        "then_branch": {"node_type": "SQL", "query": "t"},
    }
    same(tx, "'c' ?> 't' !> 'e'", "df.if('c', 't', 'e')")


def test_loop_prefix(tx: Conn) -> None:
    same(tx, "@> 'select 1'", "df.loop('select 1')")


def test_operators_on_typed_text_columns(tx: Conn) -> None:
    rows = tx.execute("""
        select a ~> b from (values ('select 1'::text, 'select 2'::text),
                                   ('select 3', 'select 4')) v(a, b)""").fetchall()
    assert [json.loads(r[0])["right_node"]["query"] for r in rows] == ["select 2", "select 4"]


@pytest.mark.parametrize(
    "expr",
    [
        "null ~> 'b'",
        "'a' ~> null",
        "null::text |=> 'n'",
        "'a' |=> null",
        "null & 'b'",
        "'a' & null::text",
        "null | 'b'",
        "'a' | null::text",
        "null ?> 't'",
        "'c' ?> null",
        "null !> 'e'",
        "('c' ?> 't') !> null",
        "@> null::text",
    ],
)
def test_null_operand_gives_null(tx: Conn, expr: str) -> None:
    assert one(tx, f"select {expr}", strict=True) is None


# ---------------------------------------------------------------------------------------
# precedence: one level, left to right (docs/api.md "Operators")


def test_then_join_groups_left(tx: Conn) -> None:
    same(tx, "'a' ~> 'b' & 'c'", "df.join(df.seq('a', 'b'), 'c')")
    same(tx, "'a' & 'b' ~> 'c'", "df.seq(df.join('a', 'b'), 'c')")
    same(tx, "'a' | 'b' & 'c' ~> 'd'", "df.seq(df.join(df.race('a', 'b'), 'c'), 'd')")


def test_as_names_the_whole_left(tx: Conn) -> None:
    same(tx, "'a' ~> 'b' |=> 'x'", "df.as(df.seq('a', 'b'), 'x')")
    same(tx, "'a' ~> ('b' |=> 'x')", "df.seq('a', df.as('b', 'x'))")


def test_prefix_loop_takes_only_the_next_operand(tx: Conn) -> None:
    # (@> a) ~> b: b comes after an infinite loop, so it is unreachable (by design)
    same(tx, "@> 'a' ~> 'b'", "df.seq(df.loop('a'), 'b')")
    same(tx, "@> ('a' ~> 'b')", "df.loop(df.seq('a', 'b'))")


def test_then_before_if_works(tx: Conn) -> None:
    # ((p ~> c) ?> t) !> e: the condition is the THEN, which yields c's result
    same(tx, "'p' ~> 'c' ?> 't' !> 'e'", "df.if(df.seq('p', 'c'), 't', 'e')")


def test_composite_then_branch_needs_parentheses(tx: Conn) -> None:
    # c ?> a ~> b !> e = ((c ?> a) ~> b) !> e: ~> refuses the partial
    msg = fails(tx, "select 'c' ?> 'a' ~> 'b' !> 'e'")
    assert "incomplete IF" in msg
    assert "c ?> (a ~> b) !> e" in msg
    same(tx, "'c' ?> ('a' ~> 'b') !> 'e'", "df.if('c', df.seq('a', 'b'), 'e')")


def test_else_needs_a_partial(tx: Conn) -> None:
    msg = fails(tx, "select 'a' ~> 'b' !> 'e'")
    assert '!> needs "condition ?> then_branch" on its left, got a THEN node' in msg


def test_lone_partial_is_just_a_value(tx: Conn) -> None:
    # a lone ?> builds the partial; df.start later treats it as SQL text (docs/api.md "Operators")
    assert json.loads(one(tx, "select 'c' ?> 't'"))["_partial_if"] is True


def test_same_level_as_concatenation(tx: Conn) -> None:
    # || shares the level: 'select ' || '1' ~> 'b' = ('select ' || '1') ~> 'b'
    same(tx, "'select ' || '1' ~> 'b'", "df.seq('select 1', 'b')")


def test_looser_than_arithmetic_and_casts(tx: Conn) -> None:
    # + and :: bind first; then ~> and || group left to right: ('a' ~> 'select ') || '3'
    same(tx, "'a' ~> 'select ' || (1 + 2)::text", "df.seq('a', 'select ') || '3'")
    same(tx, "df.sleep(1 + 2) ~> 'b'", "df.seq(df.sleep(3), 'b')")


def test_tighter_than_comparison_and_boolean(tx: Conn) -> None:
    assert one(tx, "select 'a' ~> 'b' = df.seq('a', 'b')") is True
    assert one(tx, "select 'a' ~> 'b' is not null and 'a' & 'b' is not null") is True


def test_nested_mixture(tx: Conn) -> None:
    same(
        tx,
        "('a' |=> 'x') ~> (df.sleep(1) | 'b') ~> ('c' ?> ('d' & 'e') !> @> 'f')",
        "df.seq(df.seq(df.as('a', 'x'), df.race(df.sleep(1), 'b')),"
        "       df.if('c', df.join('d', 'e'), df.loop('f')))",
    )
