"""Cron expressions of ``df.wait_for_schedule`` (docs/decisions.md D7), in UTC.

pgdurable uses **standard 5-field cron** through the maintained ``cronsim`` library (no
hand-written parser): ``minute hour day-of-month month day-of-week``, with ``*``, lists,
ranges, steps (``*/15``, ``10-50/20``), month names ``JAN``-``DEC`` and weekday names
``SUN``-``SAT`` (any case), weekdays **0-6 = Sun-Sat and 7 = Sun**, and the macros
``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and
``@hourly``. cronsim's extensions are accepted too: ``L`` (last day of month), ``LW``,
``5L`` (last Friday) and ``5#2`` (second Friday). When both day-of-month and day-of-week
are restricted, a day matching either runs (Vixie/Debian cron semantics).

How this differs from pg_durable: the original prefixes ``"0 "`` (seconds) and parses with
the Rust ``cron`` crate 0.13, which numbers weekdays **1-7 = Sun-Sat** and rejects 0; there
``1-5`` means Sunday-Thursday, here it means Monday-Friday as in every other cron. The
original also accepts a sixth (year) field; pgdurable accepts exactly five fields. Weekday
names mean the same in both, so ``MON-FRI`` is the portable spelling.

Ticks are computed in UTC, strictly after the given instant, to the whole minute.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cronsim import CronSim, CronSimError

__all__ = ["FIELD_NAMES", "MACROS", "next_tick", "validate"]

#: The five fields, in order, as named in error messages.
FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")

#: Macros cronsim does not know, mapped to their standard 5-field meaning.
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# cronsim's messages are "Bad <field>" with these names for the 6-field form.
_CRONSIM_FIELD = {
    "Bad minute": 0,
    "Bad hour": 1,
    "Bad day-of-month": 2,
    "Bad month": 3,
    "Bad day-of-week": 4,
}
# An instant that cannot fail date arithmetic, for validating alone.
_PROBE = datetime(2000, 1, 1, tzinfo=UTC)


def _expand(expr: str) -> str:
    if not isinstance(expr, str):
        raise ValueError(f"cron expression must be text, not {type(expr).__name__}")
    text = expr.strip()
    if text.startswith("@"):
        macro = MACROS.get(text.lower())
        if macro is None:
            known = ", ".join(MACROS)
            raise ValueError(
                f"invalid cron expression {expr!r}: unknown macro (use one of {known})"
            )
        return macro
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"invalid cron expression {expr!r}: expected 5 fields "
            f"(minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    return " ".join(fields)


def _sim(expr: str, after: datetime) -> CronSim:
    text = _expand(expr)
    try:
        return CronSim(text, after)
    except CronSimError as exc:
        index = _CRONSIM_FIELD.get(str(exc))
        if index is None:
            raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None
        field = FIELD_NAMES[index]
        value = text.split()[index]
        raise ValueError(
            f"invalid cron expression {expr!r}: bad {field} field {value!r}"
            + (" (weekdays are 0-7 or SUN-SAT; 0 and 7 are Sunday)" if index == 4 else "")
        ) from None


def _first(sim: CronSim, expr: str) -> datetime:
    try:
        return next(sim)
    except StopIteration:
        raise ValueError(f"invalid cron expression {expr!r}: it never matches a date") from None


def validate(expr: str) -> None:
    """Raise :class:`ValueError` naming the field if ``expr`` is not a usable cron expression."""
    _first(_sim(expr, _PROBE), expr)


def next_tick(expr: str, after: datetime) -> datetime:
    """Return the first tick of ``expr`` strictly after ``after``, as an aware UTC datetime.

    ``after`` must be timezone-aware (any zone; it is converted to UTC).
    """
    if after.tzinfo is None or after.utcoffset() is None:
        raise ValueError("after must be a timezone-aware datetime")
    return _first(_sim(expr, after.astimezone(UTC)), expr)
