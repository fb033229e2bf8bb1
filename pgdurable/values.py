"""Node result values: the SQL envelope, condition truthiness, break values and size caps.

Pure functions, no I/O; the worker calls them once per step.

- :func:`sql_envelope` builds a SQL node's result ``{"rows", "row_count", "columns"}`` from
  the rows PostgreSQL rendered with ``to_json(record)`` (docs/api.md "Node results":
  ``columns`` keeps the select order because ``df.nodes.result`` is jsonb and sorts keys).
- :func:`truthy` judges a condition's result (docs/api.md "Conditions").
- :func:`break_value` turns the (already substituted) ``df.break`` text into its value (§9).
- :func:`check_size` encodes a result and enforces the configured cap: the worker records
  every leaf result (SQL rows, signal data, HTTP bodies, BREAK values, timers) through it,
  at one place (``Checkpointer.record`` in pgdurable/worker/checkpoint.py), so one cap
  covers them all.
- :func:`error_text` bounds an error message before it is stored (a failure is copied to
  every enclosing composite, up to 256 levels).
- :func:`loads` parses JSON text exactly and :func:`json_bytes` / :func:`json_text` encode
  it back exactly (see "Numbers" below).

Numbers. Results stay JSON numbers, exact, as PostgreSQL's jsonb stores them: every digit
and the scale (``12.50`` stays ``12.50``, a 40-digit numeric keeps its 40 digits). A number
that a float or a 64-bit integer cannot hold exactly (a fraction, an exponent, an integer
beyond 64 bits) is parsed as a :class:`~decimal.Decimal` (an integer within 64 bits stays an
``int``) and written back as PostgreSQL's numeric text (plain notation, its scale kept)
through an ``orjson.Fragment``. ``NaN``/``Infinity`` arrive from PostgreSQL as JSON strings
and stay strings. The one number that fails is one jsonb cannot store either (beyond
numeric's range: more than 131072 digits before the point or 16383 after it, possible only
inside a json column), with a message saying so. Texts without such a number (most rows)
cost one orjson parse and a check of its value's types.

Storage bounds (docs/security.md, "Amplification"): a step result is stored once (composites
refer to it, ``pgdurable.worker.instance``); one checkpoint carries at most
:data:`CHECKPOINT_MAX_BYTES`; one instance holds at most ``pg_durable.max_instance_bytes``
(:data:`INSTANCE_MAX_BYTES_DEFAULT`) of results.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from pgdurable.errors import ResultTooLarge, StepError

__all__ = [
    "CHECKPOINT_MAX_BYTES",
    "ERROR_TEXT_MAX",
    "INSTANCE_MAX_BYTES_DEFAULT",
    "MAX_RESULT_BYTES_SETTING",
    "break_value",
    "check_size",
    "effective_limit",
    "error_text",
    "first_column",
    "is_row_set",
    "json_bytes",
    "json_text",
    "loads",
    "number_text",
    "sql_envelope",
    "too_large",
    "truthy",
]

#: The setting named by :class:`ResultTooLarge` messages unless the caller names another.
MAX_RESULT_BYTES_SETTING = "pg_durable.max_result_bytes"
#: The most one checkpoint may carry (node results + named results), whatever the result cap
#: says: far below PostgreSQL's 256 MB jsonb and 1 GB parameter limits, so a checkpoint never
#: fails there (and is retried) but fails its step cleanly here.
CHECKPOINT_MAX_BYTES = 64 * 1024 * 1024
#: Default of pg_durable.max_instance_bytes: the results one instance may hold at once (the
#: nodes' results and its named results).
INSTANCE_MAX_BYTES_DEFAULT = 256 * 1024 * 1024
#: An error message is stored (and copied up the failed composites) up to this many bytes.
ERROR_TEXT_MAX = 16 * 1024

# Condition words (docs/api.md "Conditions"), compared after strip() + lower().
_TRUE_WORDS = frozenset({"true", "t", "yes"})
_FALSE_WORDS = frozenset({"false", "f", "no"})
# "numeric text": a plain decimal number. Deliberately narrower than float(): no "nan",
# "inf", "1_000" or hex, which are "other text" and therefore true.
_NUMERIC_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# A NUL character in compact JSON: \u0000 after an even number of backslashes (jsonb refuses
# it, so a checkpoint holding one would fail every time)
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# PostgreSQL's numeric (what jsonb stores every number as) holds at most 131072 digits before
# the decimal point (the leading one at 10**131071) and 16383 after it.
_NUMERIC_MAX_ADJUSTED = 131071
_NUMERIC_MAX_SCALE = 16383
# The integers orjson reads and writes exactly (beyond them it reads a float, writes nothing)
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_NESTED = (dict, list)


def number_text(value: Decimal) -> str:
    """A Decimal as PostgreSQL's numeric renders it: plain notation, every digit, its scale
    (``Decimal("12.50")`` → ``12.50``, ``Decimal("1E-7")`` → ``0.0000001``).

    ValueError for a finite number numeric (and so jsonb) cannot hold. NaN and ±Infinity
    give the JSON strings PostgreSQL's ``to_json`` gives them (``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``); they are not numbers in JSON.
    """
    if not value.is_finite():
        if value.is_nan():
            return '"NaN"'
        return '"-Infinity"' if value.is_signed() else '"Infinity"'
    text = str(value)
    if "E" not in text:
        return text  # the common case: str() already is plain notation
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    zero = not any(digits)
    if -exponent > _NUMERIC_MAX_SCALE or (
        not zero and exponent + len(digits) - 1 > _NUMERIC_MAX_ADJUSTED
    ):
        shown = text if len(text) <= 40 else f"{text[:20]}…{text[-12:]}"
        raise ValueError(
            f"the number {shown} is beyond the range of PostgreSQL's numeric "
            "(at most 131072 digits before the decimal point and 16383 after "
            "it), which jsonb stores every number as"
        )
    if zero and exponent > 0:
        return "-0" if sign else "0"  # numeric's zero has no exponent: 0E+5 is 0
    return format(value, "f")


def _default(value: Any) -> Any:
    """orjson's ``default``: a Decimal is written as its exact text (a Fragment)."""
    if isinstance(value, Decimal):
        return orjson.Fragment(number_text(value))
    raise TypeError


def _encode_slow(value: Any) -> bytes:
    """Encode what orjson refuses as a whole (integers beyond 64 bits, nesting deeper than its
    254 levels) without recursion, every scalar exactly as :func:`json_bytes` would."""
    out = bytearray()
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):  # punctuation pushed below
            out += item
        elif isinstance(item, dict):
            parts: list[Any] = [b"{"]
            for i, (key, val) in enumerate(item.items()):
                if not isinstance(key, str):
                    raise ValueError(f"object key {key!r} is not text")
                parts += [b"," if i else b"", _scalar(key), b":", val]
            parts.append(b"}")
            stack.extend(reversed(parts))
        elif isinstance(item, list | tuple):
            parts = [b"["]
            for i, val in enumerate(item):
                parts += [b"," if i else b"", val]
            parts.append(b"]")
            stack.extend(reversed(parts))
        else:
            out += _scalar(item)
    return bytes(out)


def _scalar(value: Any) -> bytes:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not (_INT_MIN <= value <= _INT_MAX)
    ):
        value = Decimal(value)  # exact, and not bound by int's 4300-digit str() limit
    try:
        return orjson.dumps(value, default=_default)
    except TypeError as exc:
        if isinstance(exc.__cause__, ValueError):
            raise exc.__cause__ from None
        if isinstance(value, str):
            raise ValueError("a string holds a lone surrogate (it is not UTF-8)") from None
        raise ValueError(f"a {type(value).__name__} value is not JSON") from None


def json_bytes(value: Any) -> bytes:
    """Encode a JSON value compactly as UTF-8 bytes, keeping key order and every number's
    digits and scale (a Decimal as PostgreSQL's numeric text, see :func:`number_text`).

    ValueError when the value cannot be JSON stored by PostgreSQL: a number beyond numeric's
    range, a string with a lone surrogate, a key that is not text.
    """
    try:
        return orjson.dumps(value, default=_default)
    except TypeError as exc:
        if isinstance(exc.__cause__, ValueError):  # number_text refused a number
            raise exc.__cause__ from None
    # an integer beyond 64 bits, nesting deeper than orjson's 254 levels, a lone surrogate
    return _encode_slow(value)


def json_text(value: Any) -> str:
    """Encode a JSON value compactly as text (see :func:`json_bytes`)."""
    return json_bytes(value).decode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not json")


def _parse_int(text: str) -> int | Decimal:
    """A JSON integer: an int where orjson reads one too (64 bits), else a Decimal (exact,
    and not bound by int's 4300-digit limit)."""
    if len(text) < 19:
        return int(text)
    value = Decimal(text)
    return int(value) if _INT_MIN <= value <= _INT_MAX else value


def _inexact(value: Any) -> bool:
    """Whether orjson's parse holds a float: it reads every number with a fraction or an
    exponent, and every integer beyond 64 bits, as one (losing digits and the scale), and
    every other number exactly. One pass over the containers, their items' types collected
    in C (cheaper than scanning the text); no recursion, whatever the depth."""
    kind = type(value)
    if kind is float:
        return True
    if kind is not dict and kind is not list:
        return False
    if kind is dict:  # a row of scalars, the common case: one look
        kinds = set(map(type, value.values()))
        if float in kinds:
            return True
        if dict not in kinds and list not in kinds:
            return False
    stack = [value]
    while stack:
        item = stack.pop()
        items = item.values() if type(item) is dict else item
        kinds = set(map(type, items))
        if float in kinds:
            return True
        if dict in kinds or list in kinds:
            stack.extend(x for x in items if type(x) in _NESTED)
    return False


def _loads(text: str | bytes) -> Any:
    """Parse JSON text exactly (see "Numbers" in the module docstring).

    orjson first; when what it read holds a float (a number it may have lost digits or the
    scale of), the text is parsed again by the standard library with Decimals for fractions,
    exponents and integers beyond 64 bits. Both refuse ``NaN``/``Infinity`` (not JSON;
    PostgreSQL writes them as strings).
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        pass  # 1e400, or deeper than orjson reads: the stdlib decides (ValueError if not JSON)
    else:
        if not _inexact(value):
            return value
    try:
        return json.loads(
            text, parse_float=Decimal, parse_int=_parse_int, parse_constant=_reject_constant
        )
    except RecursionError:
        # deeper than Python can represent (orjson stops at 1024 levels, the stdlib near 1000)
        raise ValueError("it nests too deeply") from None


def loads(text: str | bytes | memoryview) -> Any:
    """Parse JSON text exactly (see :func:`_loads`); ValueError when it is not JSON or nests
    deeper than Python can hold. The worker's psycopg JSON loader."""
    return _loads(text if isinstance(text, str | bytes) else bytes(text))


def is_row_set(result: Any) -> bool:
    """True when ``result`` is a SQL node's envelope (a dict whose ``rows`` is a list)."""
    return isinstance(result, dict) and isinstance(result.get("rows"), list)


def first_column(result: dict[str, Any], row: dict[str, Any]) -> tuple[bool, Any]:
    """Return ``(has_column, value)`` for the first column of ``row`` of a row set.

    The column order comes from the envelope's ``columns`` list when present (§9), else
    from the row's first key. A row without columns gives ``(False, None)``.
    """
    columns = result.get("columns")
    if isinstance(columns, list) and columns and isinstance(columns[0], str):
        return True, row.get(columns[0])
    # no usable columns list (a break value shaped like rows may carry anything there)
    for key in row:
        return True, row[key]
    return False, None


def _judge(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, Decimal):
        return not value.is_zero()  # NaN (never parsed: PostgreSQL writes "NaN") is true
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return False
        word = text.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        if _NUMERIC_TEXT.fullmatch(text):
            try:
                # Decimal, not float: "1e-400" is not zero.
                return Decimal(text) != 0
            except InvalidOperation:  # pragma: no cover - the regex admits only decimals
                return True
        return True
    if isinstance(value, list | dict):
        return len(value) > 0
    # Anything else: judged by Python truthiness.
    return bool(value)


def truthy(result: Any) -> bool:
    """Judge a condition node's result (docs/api.md "Conditions").

    With ``rows``: zero rows is false, else the first column of the first row is judged.
    Otherwise the whole value is judged: bool as-is; number ≠ 0; string trimmed: ``''``
    false, ``true/t/yes`` true, ``false/f/no`` false (any case), numeric text ≠ 0, other
    text true; array/object non-empty; null false.
    """
    if is_row_set(result):
        rows = result["rows"]
        if not rows:
            return False
        row = rows[0]
        if not isinstance(row, dict):
            return _judge(row)
        _, value = first_column(result, row)
        return _judge(value)
    return _judge(result)


def sql_envelope(row_texts: list[str]) -> dict[str, Any]:
    """Build a SQL node's result from rows rendered by PostgreSQL's ``to_json(record)``.

    Returns ``{"rows": [...], "row_count": n, "columns": [...]}``; ``columns`` is the
    select order (orjson keeps key order) and ``[]`` when there are no rows. A statement
    that selects one column name twice keeps the last value under that name (a JSON object
    cannot hold both), as PostgreSQL's own ``to_jsonb`` does.

    A statement without result rows (DML without RETURNING, DDL, CALL) gets ``rows`` ``[]``
    and ``row_count`` 0, as in pg_durable, plus ``rows_affected``: the rows it processed
    (its command tag's count), which the runner sends as one bare JSON number (a result row
    is always an object, so the two cannot be confused).
    """
    rows: list[Any] = []
    affected: int | None = None
    for text in row_texts:
        try:
            row = _loads(text)
        except ValueError as exc:
            raise StepError(f"row {text[:200]!r} from postgresql is not valid json: {exc}") from exc
        if isinstance(row, int) and not isinstance(row, bool) and len(row_texts) == 1:
            affected = row
            continue
        if not isinstance(row, dict):
            raise StepError(f"row {text[:200]!r} from postgresql is not a json object")
        rows.append(row)
    columns = list(rows[0]) if rows else []
    if affected is not None:
        return {"rows": rows, "row_count": 0, "columns": columns, "rows_affected": affected}
    return {"rows": rows, "row_count": len(rows), "columns": columns}


def break_value(text: str | None) -> Any:
    """Value of ``df.break(text)``: JSON if the text parses, else the text; ``None`` if absent.

    The caller substitutes the text first, in raw mode (docs/api.md "NULL arguments").
    """
    if text is None:
        return None
    try:
        return _loads(text)
    except ValueError:
        return text


def effective_limit(limit_bytes: int) -> int:
    """The cap a ``limit_bytes`` setting gives: itself, but never more than one checkpoint
    carries (≤ 0 = that bound alone)."""
    return limit_bytes if 0 < limit_bytes <= CHECKPOINT_MAX_BYTES else CHECKPOINT_MAX_BYTES


def too_large(
    what: str, size: int, limit_bytes: int, setting: str = MAX_RESULT_BYTES_SETTING
) -> ResultTooLarge:
    """The error of a value of ``size`` bytes over the cap ``limit_bytes`` gives."""
    limit = effective_limit(limit_bytes)
    if limit != limit_bytes:
        return ResultTooLarge(
            f"{what} is {size} bytes, over the limit of {limit} bytes that one checkpoint may carry"
        )
    return ResultTooLarge(
        f"{what} is {size} bytes, over the limit of {limit} bytes; raise {setting} to allow it"
    )


def check_size(
    value: Any, limit_bytes: int, what: str, *, setting: str = MAX_RESULT_BYTES_SETTING
) -> bytes:
    """Return the compact JSON encoding of ``value``, or raise if it exceeds ``limit_bytes``.

    ``what`` names the value in the message (e.g. ``"result of node 'load'"``); ``setting``
    is the setting that raises the limit. A ``limit_bytes`` ≤ 0 means no limit but the one
    every checkpoint has (:data:`CHECKPOINT_MAX_BYTES`), which no setting raises. A value
    that cannot be encoded (a lone surrogate, a number beyond numeric's range) fails too: it
    could not be stored either.
    """
    try:
        data = json_bytes(value)
    except ValueError as exc:  # a lone surrogate (not UTF-8), a number jsonb cannot hold
        raise StepError(f"{what} cannot be stored: {exc}") from None
    if len(data) > effective_limit(limit_bytes):
        raise too_large(what, len(data), limit_bytes, setting)
    if b"\\u0000" in data and _JSON_NUL.search(data):
        raise StepError(
            f"{what} cannot be stored: it holds a NUL character (\\u0000), which "
            "PostgreSQL's jsonb refuses"
        )
    return data


def error_text(message: str) -> str:
    """An error message as stored: at most :data:`ERROR_TEXT_MAX` bytes of UTF-8 (cut at a
    character boundary, with a note saying how long it was)."""
    data = message.encode("utf-8", "surrogatepass")
    if len(data) <= ERROR_TEXT_MAX:
        return message
    cut = data[:ERROR_TEXT_MAX].decode("utf-8", "ignore")
    return f"{cut}… (error message cut: {len(data)} bytes)"
