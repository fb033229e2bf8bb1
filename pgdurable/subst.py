"""Substitution of ``{var}`` and ``$ref`` into a step's text at execution time.

docs/api.md "Substitution" describes the rules for users.

Pure and I/O-free; the worker calls :func:`substitute` once per step target (SQL text, HTTP
url/body/header values, multipart url/headers/part name/filename) and
:func:`substitute_whole_value` for a multipart part's ``data_b64``.

Pass 1, ``{name}``: one left-to-right pass over the text. ``{sys_instance_id}``,
``{sys_label}`` (``''`` without a label) and ``{var}`` (the frozen vars snapshot) are
inserted raw, in both modes, and the inserted text is not rescanned by pass 1. The two
``sys_`` names win over a user var of the same name. Unknown braces are kept.

Pass 2, ``$`` refs, over pass 1's output (a var may therefore hold a ``$ref``; vars are the
submitter's own input). Only registered names (keys of ``results``) are recognised, longest
first, and a name must end at a non-identifier character; PostgreSQL's identifier
characters are letters, digits, ``_`` and ``$``, so ``$tag$`` (a dollar-quote tag) is never
a reference. Inserted values are never rescanned.

=============  ===================================================================
``$n``         first column of the first row (``columns`` order); fails on no rows
               or NULL. On a non-row result (no ``rows`` list: HTTP envelope,
               signal, JOIN array, break value…) the whole value.
``$n?``        the same, but no rows or NULL gives SQL ``NULL`` / raw ``null``
``$n.col``     the named column of the first row, or the top-level field of a
               non-row object; fails on no rows or NULL; a missing column fails,
               naming the columns (or fields) the result has
``$n.col?``    the same, null-safe
``$n.*``       every row: SQL ``(VALUES (…),(…)) AS "n"("c1",…)``, raw a JSON array
               of the row objects; more than ``max_star_rows`` rows fails
=============  ===================================================================

Rendering. Raw mode: strings as they are, ``null``/``true``/``false``/numbers and
objects/arrays as compact JSON. SQL mode: numbers and booleans bare (a negative number in
parentheses, so ``10-$n`` cannot become a ``--`` comment), strings and objects/arrays
(their JSON text) as string literals, NULL as ``NULL``. Inside ``$n.*`` a string cell is
``'…'::text`` and an object/array cell ``'…'::jsonb`` so ``VALUES`` gets a definite type.
A number is written with every digit and its scale, in both modes (``12.50`` stays
``12.50``; a Decimal as PostgreSQL's numeric text, :func:`pgdurable.values.number_text`).

Injection. A SQL-mode literal is one self-contained token whatever the value holds and
whatever ``standard_conforming_strings`` is: a plain ``'…'`` (quotes doubled) when the
value has no backslash, ``$``, ``*`` or control character, else an escape string ``E'…'``
in which those characters are written as ``\\\\`` / ``\\xHH``. So a value can end neither
the statement, nor a dollar-quoted body it is placed in (``$$`` never appears), nor a
``--`` comment (no newline appears) nor a ``/* */`` comment (no ``*`` appears). A value
containing NUL (which PostgreSQL text cannot hold) fails. What this cannot protect is a
reference written *inside* a quoted literal or quoted identifier of the step's SQL
(``'hello $n'``): the inserted literal closes the surrounding quotes. Write
``'hello ' || $n`` instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

from pgdurable.errors import SubstitutionError
from pgdurable.values import first_column, is_row_set, json_text, number_text

__all__ = [
    "MAX_STAR_ROWS_DEFAULT",
    "Mode",
    "sql_literal",
    "substitute",
    "substitute_whole_value",
]

Mode = Literal["sql", "raw"]

#: ``$n.*`` refuses a result with more rows than this (docs/api.md "Substitution").
#: Defaults to 10,000.
MAX_STAR_ROWS_DEFAULT = 10_000

# Pass 1: any brace pair without nested braces; the inside is looked up as a name, so
# JSON bodies such as {"a": 1} are simply kept (no var of that name).
_BRACES = re.compile(r"\{([^{}]+)\}")
# The whole-value forms allowed in data_b64 (plus surrounding whitespace).
_WHOLE_BRACE = re.compile(r"\s*\{([^{}]+)\}\s*")
# Literal text that needs the E'' form (see the module docstring).
_NEEDS_ESCAPE = re.compile(r"[\\$*\x00-\x1f\x7f]")
_ESCAPES = {ord("\\"): "\\\\", ord("'"): "''", ord("$"): "\\x24", ord("*"): "\\x2a"}
_ESCAPES.update({c: f"\\x{c:02x}" for c in [*range(0x01, 0x20), 0x7F]})


def sql_literal(text: str) -> str:
    """Quote ``text`` as one self-contained PostgreSQL string literal (see module docstring)."""
    if _NEEDS_ESCAPE.search(text) is None:
        return "'" + text.replace("'", "''") + "'"
    if "\x00" in text:
        raise SubstitutionError("value contains a NUL character, which postgresql text cannot hold")
    return "E'" + text.translate(_ESCAPES) + "'"


def _quote_ident(name: str) -> str:
    if "\x00" in name:
        raise SubstitutionError(f"identifier {name!r} contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


def _sql_number(value: int | float | Decimal) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "'NaN'::float8"
        if math.isinf(value):
            return "'Infinity'::float8" if value > 0 else "'-Infinity'::float8"
        text = repr(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            return f"{number_text(value)[1:-1]!r}::numeric"  # 'NaN', 'Infinity', '-Infinity'
        try:
            # a numeric literal with every digit and the scale: 12.50 stays 12.50
            text = number_text(value)
        except ValueError as exc:
            raise SubstitutionError(str(exc)) from None
    else:
        text = str(value)
    # A bare negative number after '-' would start a '--' comment: parenthesise it.
    return f"({text})" if text.startswith("-") else text


def _render_sql(value: Any) -> str:
    """Render a non-null JSON value for SQL mode."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return _sql_number(value)
    if isinstance(value, str):
        return sql_literal(value)
    return sql_literal(_json(value))


def _render_raw(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _json(value)


def _json(value: Any) -> str:
    """A value's JSON text (numbers exact); a value JSON cannot hold fails the reference."""
    try:
        return json_text(value)
    except ValueError as exc:
        raise SubstitutionError(str(exc)) from None


def _render_cell(value: Any) -> str:
    """Render one ``$n.*`` cell for SQL mode, with a definite type for VALUES."""
    if value is None:
        return "NULL"
    if isinstance(value, bool | int | float | Decimal):
        return _render_sql(value)
    if isinstance(value, str):
        return sql_literal(value) + "::text"
    return sql_literal(_json(value)) + "::jsonb"


@lru_cache(maxsize=512)
def _ref_pattern(names: frozenset[str]) -> re.Pattern[str]:
    """The pass-2 regex for one set of registered names (cached: sets repeat step to step)."""
    alternation = "|".join(re.escape(n) for n in sorted(names, key=lambda n: (-len(n), n)))
    return re.compile(
        r"\$(?P<name>" + alternation + r")(?![\w$])"
        r"(?:(?P<star>\.\*)|(?:\.(?P<col>[^\W\d]\w*))?(?P<opt>\?)?)"
    )


def _pass1(text: str, vars: Mapping[str, str], instance_id: str, label: str | None) -> str:
    if "{" not in text:
        return text

    def repl(m: re.Match[str]) -> str:
        key = m.group(1)
        if key == "sys_instance_id":
            return instance_id
        if key == "sys_label":
            return label or ""
        value = vars.get(key)
        return m.group(0) if value is None else value

    return _BRACES.sub(repl, text)


class _Missing(Exception):
    """A ``$n.col`` whose column does not exist (an error naming what the result has)."""


def _has(result: Any) -> str:
    """What a result offers to ``$n.col``, for an error message."""
    if is_row_set(result):
        columns = result.get("columns")
        if not isinstance(columns, list) or not columns:
            first = result["rows"][0] if result["rows"] else None
            columns = list(first) if isinstance(first, dict) else []
        shown = ", ".join(str(c) for c in columns[:20]) + (", …" if len(columns) > 20 else "")
        return f"its columns: {shown}" if columns else "it has no columns"
    if isinstance(result, dict):
        keys = list(result)
        shown = ", ".join(str(k) for k in keys[:20]) + (", …" if len(keys) > 20 else "")
        return f"its fields: {shown}" if keys else "it has no fields"
    kind = (
        "an array"
        if isinstance(result, list)
        else "a string"
        if isinstance(result, str)
        else "null"
        if result is None
        else "a boolean"
        if isinstance(result, bool)
        else "a number"
    )
    return f"it is {kind}, not an object"


def _lookup(ref: str, name: str, result: Any, col: str | None, optional: bool) -> Any:
    """Return the value a scalar ref designates (``None`` = NULL, only when optional)."""
    hint = f"; use {ref}? to substitute null" if not optional else ""
    if is_row_set(result):
        rows = result["rows"]
        if not rows:
            if optional:
                return None
            raise SubstitutionError(f"{ref}: result {name!r} has no rows")
        row = rows[0]
        if not isinstance(row, dict):
            raise SubstitutionError(f"{ref}: result {name!r} has a malformed first row")
        if col is None:
            has_column, value = first_column(result, row)
            if not has_column:
                raise SubstitutionError(f"{ref}: result {name!r} has no columns")
            what = "the first column of result"
        else:
            if col not in row:
                raise _Missing
            value = row[col]
            what = f"column {col!r} of result"
        if value is None and not optional:
            raise SubstitutionError(f"{ref}: {what} {name!r} is null{hint}")
        return value
    if col is None:
        if result is None and not optional:
            raise SubstitutionError(f"{ref}: result {name!r} is null{hint}")
        return result
    if not isinstance(result, dict) or col not in result:
        raise _Missing
    value = result[col]
    if value is None and not optional:
        raise SubstitutionError(f"{ref}: field {col!r} of result {name!r} is null{hint}")
    return value


def _star(ref: str, name: str, result: Any, mode: Mode, max_rows: int) -> str:
    if not is_row_set(result):
        raise SubstitutionError(f"{ref}: result {name!r} is not a row set (a SQL step's result)")
    rows: list[Any] = result["rows"]
    if len(rows) > max_rows:
        raise SubstitutionError(
            f"{ref}: result {name!r} has {len(rows)} rows, more than the {max_rows} "
            f"a {ref} reference may expand"
        )
    if mode == "raw":
        try:
            return _json(rows)
        except SubstitutionError as exc:
            raise SubstitutionError(f"{ref}: {exc}") from None
    try:
        return _star_sql(name, result, rows)
    except SubstitutionError as exc:
        raise SubstitutionError(f"{ref}: {exc}") from None


def _star_sql(name: str, result: Any, rows: list[Any]) -> str:
    alias = _quote_ident(name)
    if not rows:
        return f"(SELECT NULL WHERE false) AS {alias}"
    columns = result.get("columns")
    if not isinstance(columns, list):
        first = rows[0]
        columns = list(first) if isinstance(first, dict) else []
    elif not all(isinstance(c, str) for c in columns):
        # a value shaped like rows (a break value) whose columns are not names
        raise SubstitutionError(f"result {name!r} has a malformed columns list (not names)")
    if not columns:
        # rows without columns (SELECT FROM t): as many empty rows
        return f"(SELECT FROM generate_series(1, {len(rows)})) AS {alias}"
    tuples = []
    for row in rows:
        if not isinstance(row, dict):
            raise SubstitutionError(f"result {name!r} has a malformed row")
        tuples.append("(" + ",".join(_render_cell(row.get(c)) for c in columns) + ")")
    names = ",".join(_quote_ident(str(c)) for c in columns)
    return f"(VALUES {','.join(tuples)}) AS {alias}({names})"


def _pass2(text: str, mode: Mode, results: Mapping[str, Any], max_star_rows: int) -> str:
    if "$" not in text or not results:
        return text
    pattern = _ref_pattern(frozenset(results))

    def repl(m: re.Match[str]) -> str:
        name = m.group("name")
        ref = m.group(0)
        result = results[name]
        if m.group("star"):
            return _star(ref, name, result, mode, max_star_rows)
        col = m.group("col")
        optional = m.group("opt") is not None
        try:
            value = _lookup(ref, name, result, col, optional)
        except _Missing:
            # in either mode: kept as written it could only become a syntax error
            raise SubstitutionError(
                f"{ref}: result {name!r} has no column {col!r} ({_has(result)})"
            ) from None
        if value is None and mode == "sql":
            return "NULL"
        try:
            return _render_raw(value) if mode == "raw" else _render_sql(value)
        except SubstitutionError as exc:
            raise SubstitutionError(f"{ref}: {exc}") from None

    return pattern.sub(repl, text)


def substitute(
    text: str,
    *,
    mode: Mode,
    results: Mapping[str, Any],
    vars: Mapping[str, str],
    instance_id: str,
    label: str | None,
    max_star_rows: int = MAX_STAR_ROWS_DEFAULT,
) -> str:
    """Substitute ``{var}`` (pass 1) then ``$ref`` (pass 2) into ``text``.

    ``mode="sql"`` renders values as SQL literals (for SQL step text), ``mode="raw"``
    inserts strings as they are and other values as JSON (HTTP url/body/headers, break
    values). Raises :class:`SubstitutionError` naming the reference when it cannot be
    substituted.
    """
    return _pass2(_pass1(text, vars, instance_id, label), mode, results, max_star_rows)


_WHOLE_HINT = (
    "data_b64 allows only a whole-value reference ($x, $x?, $x.c, $x.c?, {v}) or literal base64"
)


def substitute_whole_value(
    text: str,
    *,
    results: Mapping[str, Any],
    vars: Mapping[str, str],
    instance_id: str,
    label: str | None,
) -> str:
    """Substitute a multipart part's ``data_b64`` (raw mode, whole value only).

    ``text`` must be literal text without ``$`` and ``{`` (returned unchanged), or exactly
    one reference ``$x``, ``$x?``, ``$x.c``, ``$x.c?`` or ``{v}``, optionally surrounded
    by whitespace. Anything else, and a reference that cannot be resolved, raises
    :class:`SubstitutionError` with a message containing ``whole-value reference``.
    """
    if "$" not in text and "{" not in text:
        return text
    m = _WHOLE_BRACE.fullmatch(text)
    if m is not None:
        out = _pass1(m.group(0).strip(), vars, instance_id, label)
        if out == m.group(0).strip():
            raise SubstitutionError(
                f"{out}: no such variable for a whole-value reference; {_WHOLE_HINT}"
            )
        return out
    stripped = text.strip()
    if results:
        ref = _ref_pattern(frozenset(results)).fullmatch(stripped)
        if ref is not None and not ref.group("star"):
            # raw mode never keeps a resolved ref: it substitutes or raises
            return _pass2(stripped, "raw", results, MAX_STAR_ROWS_DEFAULT)
    bad = stripped if len(stripped) <= 80 else stripped[:77] + "..."
    raise SubstitutionError(
        f"{bad!r} is not a whole-value reference to a produced result; {_WHOLE_HINT}"
    )
