"""A `$name` no step defines is refused where it is written: df.start and the df.explain dry
run (35_references.sql), naming the reference, the step and the names in scope."""

from __future__ import annotations

import psycopg
import pytest


def refs(tx, text):
    return tx.execute("select df._sql_refs(%s)", (text,)).fetchone()[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("select $a, $b.col, $c?, $d.*", ["a", "b", "c", "d"]),
        ("select $a + $a", ["a"]),
        ("select '$x', \"$y\", $$ $z $$, $tag$ $w $tag$, $1, a$b, $a$b", []),
        ("select 1 -- $c\n + $d", ["d"]),
        ("select /* $c */ $e", ["e"]),
        ("select E'it\\'s $q', $r", ["r"]),
        ("select 'a''$b' || $c", ["c"]),
        ("select 'unterminated $x", []),
        ("select 1", []),
        ("select {$A}, {sys_label}, $b", ["b"]),
    ],
)
def test_sql_refs_skip_quotes_comments_and_parameters(tx, text, expected):
    assert refs(tx, text) == expected


def test_start_refuses_an_unknown_reference_naming_it_and_the_names(tx, user):
    tx.execute("savepoint s")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        tx.execute(
            "select df.start(df.sql('select 1 as n') |=> 'count' "
            "~> df.sql('select 2 as m') |=> 'other' ~> 'select $cuont + 1')"
        )
    tx.execute("rollback to savepoint s")
    diag = err.value.diag
    assert diag.message_primary == (
        "unknown reference $cuont in step 'select $cuont + 1': "
        "no step of this workflow is named 'cuont' "
        "(its names: count, other)"
    )
    assert diag.message_hint == "a $ that is not a reference belongs inside quotes: '$cuont'"
    # also the dry run, and with no names at all
    out = tx.execute("select df.explain(df.sql('select $x'))").fetchone()[0]
    assert out == (
        "Invalid durable function graph: root: unknown reference $x in step "
        "'select $x': no step of this workflow is named 'x' (it names no step: "
        "name one with |=> 'name')"
    )


@pytest.mark.parametrize(
    "expr",
    [
        "df.sql('select 1 as n') |=> 'a' ~> 'select $a + 1'",
        "df.sql('select 1 as n') |=> 'a' ~> 'select $a.n, $a?, $a.n?'",
        "df.sql('select 1 as n') |=> 'a' ~> 'select * from $a.*'",
        "'select ''costs in $USD'''",
        "'select $1::int' ",
        "'do $$ begin perform 1; end $$'",
        # defined later (a loop carries it back): the name is the workflow's, so it is accepted
        "@> (df.if(df.sql('select 1'), 'select $later', 'select 2') ~> df.sql('select 3') |=> 'later'"
        " ~> df.break('{}'))",
    ],
)
def test_start_accepts_defined_quoted_and_non_references(tx, user, expr):
    assert tx.execute(f"select df.start({expr})").fetchone()[0]


def test_sql_braces_outside_quotes(tx):
    assert tx.execute(
        "select df._sql_refs(%s, true)", ("select {a}, '{b}', {sys_label}, {not a name}, {a}, $c",)
    ).fetchone()[0] == ["a", "sys_label"]


def test_start_refuses_an_unknown_variable(tx, user):
    tx.execute("select df.setvar('region', 'eu')")
    assert tx.execute(
        "select df.start('select {region}, {sys_instance_id}, {sys_label}, ''{not_checked}''')"
    ).fetchone()[0]
    tx.execute("savepoint s")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        tx.execute("select df.start('select {regoin}')")
    tx.execute("rollback to savepoint s")
    assert err.value.diag.message_primary == (
        "unknown variable {regoin} in step 'select {regoin}': df.setvar has not set 'regoin'"
    )
    assert err.value.diag.message_hint == (
        "your variables: region; and {sys_instance_id}, {sys_label}"
    )
