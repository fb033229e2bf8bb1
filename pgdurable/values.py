"""Node result values: the SQL envelope, condition truthiness, break values and size caps.

Pure functions, no I/O; the worker calls them once per step.

- :func:`sql_envelope` builds a SQL node's result ``{"rows", "row_count", "columns"}`` from
  the rows PostgreSQL rendered with ``to_json(record)`` (SPEC §3.2, §9: ``columns`` keeps the
  select order because ``df.nodes.result`` is jsonb and sorts keys).
- :func:`truthy` judges a condition's result (SPEC §3.4).
- :func:`break_value` turns the (already substituted) ``df.break`` text into its value (§9).
- :func:`check_size` encodes a result and enforces the configured cap: the worker records
  every leaf result (SQL rows, signal data, HTTP bodies, BREAK values, timers) through it,
  at one place (``Worker._complete_once``), so one cap covers them all.
- :func:`error_text` bounds an error message before it is stored (a failure is copied to
  every enclosing composite, up to 256 levels).
- :func:`json_text` encodes any JSON value to text (orjson, with a stdlib fallback for the
  integers beyond 64 bits that orjson refuses).

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

# Condition words (SPEC §3.4), compared after strip() + lower().
_TRUE_WORDS = frozenset({"true", "t", "yes"})
_FALSE_WORDS = frozenset({"false", "f", "no"})
# "numeric text": a plain decimal number. Deliberately narrower than float(): no "nan",
# "inf", "1_000" or hex, which are "other text" and therefore true.
# 19 digits in a row: possibly an integer orjson would not keep exactly (beyond int64).
_LONG_DIGITS = re.compile(r"\d{19}")
_NUMERIC_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# A NUL character in compact JSON: \u0000 after an even number of backslashes (jsonb refuses
# it, so a checkpoint holding one would fail every time)
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def json_bytes(value: Any) -> bytes:
    """Encode a JSON value compactly as UTF-8 bytes, keeping key order.

    orjson refuses integers beyond 64 bits (possible inside json/jsonb columns); those fall
    back to the standard library, which renders them exactly.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        # beyond 64 bits, or nested deeper than orjson's 254 levels
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        except RecursionError:
            raise ValueError("the value nests too deeply to be stored as JSON") from None


def json_text(value: Any) -> str:
    """Encode a JSON value compactly as text (see :func:`json_bytes`)."""
    return json_bytes(value).decode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not json")


def _loads(text: str) -> Any:
    """Parse JSON text exactly.

    orjson turns integers beyond 64 bits into (lossy) floats and refuses numbers beyond the
    double range (``1e400``); texts that may hold either go through the stdlib, which keeps
    integers exact. Both refuse ``NaN``/``Infinity``, which are not JSON.
    """
    if _LONG_DIGITS.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # maybe 1e400; the stdlib decides (and raises ValueError if not JSON)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        # deeper than Python can represent (orjson stops at 1024 levels, the stdlib near 1000)
        raise ValueError("it nests too deeply") from None


def loads(text: str | bytes) -> Any:
    """Parse JSON text exactly (see :func:`_loads`); ValueError when it is not JSON or nests
    deeper than Python can hold. The worker's psycopg JSON loader."""
    return _loads(bytes(text).decode() if not isinstance(text, str) else text)


def is_row_set(result: Any) -> bool:
    """True when ``result`` is a SQL node's envelope (a dict whose ``rows`` is a list)."""
    return isinstance(result, dict) and isinstance(result.get("rows"), list)


def first_column(result: dict[str, Any], row: dict[str, Any]) -> tuple[bool, Any]:
    """Return ``(has_column, value)`` for the first column of ``row`` of a row set.

    The column order comes from the envelope's ``columns`` list when present (§9), else
    from the row's first key. A row without columns gives ``(False, None)``.
    """
    columns = result.get("columns")
    if isinstance(columns, list) and columns:
        return True, row.get(columns[0])
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
    # Anything else (Decimal from a caller, …): judged by Python truthiness.
    return bool(value)


def truthy(result: Any) -> bool:
    """Judge a condition node's result (SPEC §3.4).

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
    """
    rows: list[Any] = []
    for text in row_texts:
        try:
            row = _loads(text)
        except ValueError as exc:
            raise StepError(f"row {text[:200]!r} from postgresql is not valid json: {exc}") from exc
        if not isinstance(row, dict):
            raise StepError(f"row {text[:200]!r} from postgresql is not a json object")
        rows.append(row)
    columns = list(rows[0]) if rows else []
    return {"rows": rows, "row_count": len(rows), "columns": columns}


def break_value(text: str | None) -> Any:
    """Value of ``df.break(text)``: JSON if the text parses, else the text; ``None`` if absent.

    The caller substitutes the text first, in raw mode (SPEC §9).
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


def too_large(what: str, size: int, limit_bytes: int,
              setting: str = MAX_RESULT_BYTES_SETTING) -> ResultTooLarge:
    """The error of a value of ``size`` bytes over the cap ``limit_bytes`` gives."""
    limit = effective_limit(limit_bytes)
    if limit != limit_bytes:
        return ResultTooLarge(f"{what} is {size} bytes, over the limit of {limit} bytes that "
                              "one checkpoint may carry")
    return ResultTooLarge(f"{what} is {size} bytes, over the limit of {limit} bytes; "
                          f"raise {setting} to allow it")


def check_size(
    value: Any, limit_bytes: int, what: str, *, setting: str = MAX_RESULT_BYTES_SETTING
) -> bytes:
    """Return the compact JSON encoding of ``value``, or raise if it exceeds ``limit_bytes``.

    ``what`` names the value in the message (e.g. ``"result of node 'load'"``); ``setting``
    is the setting that raises the limit. A ``limit_bytes`` ≤ 0 means no limit but the one
    every checkpoint has (:data:`CHECKPOINT_MAX_BYTES`), which no setting raises. A value
    that cannot be encoded (nested too deeply) fails too: it could not be stored either.
    """
    try:
        data = json_bytes(value)
    except ValueError as exc:  # too deep, or a lone surrogate (not UTF-8)
        raise StepError(f"{what} cannot be stored: {exc}") from None
    if len(data) > effective_limit(limit_bytes):
        raise too_large(what, len(data), limit_bytes, setting)
    if b"\\u0000" in data and _JSON_NUL.search(data):
        raise StepError(f"{what} cannot be stored: it holds a NUL character (\\u0000), which "
                        "PostgreSQL's jsonb refuses")
    return data


def error_text(message: str) -> str:
    """An error message as stored: at most :data:`ERROR_TEXT_MAX` bytes of UTF-8 (cut at a
    character boundary, with a note saying how long it was)."""
    data = message.encode("utf-8", "surrogatepass")
    if len(data) <= ERROR_TEXT_MAX:
        return message
    cut = data[:ERROR_TEXT_MAX].decode("utf-8", "ignore")
    return f"{cut}… (error message cut: {len(data)} bytes)"
