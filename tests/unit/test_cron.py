"""Unit tests of pgdurable.cron: standard 5-field cron in UTC via cronsim (docs/decisions.md D7)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pgdurable.cron import next_tick, validate


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# 2024-01-06 is a Saturday, 2024-01-07 a Sunday, 2024-01-08 a Monday.
SAT = at(2024, 1, 6, 12, 0)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("* * * * *", at(2024, 1, 1, 0, 0, 0), at(2024, 1, 1, 0, 1)),
        ("* * * * *", at(2024, 1, 1, 0, 0, 30), at(2024, 1, 1, 0, 1)),
        ("*/15 * * * *", at(2024, 1, 1, 0, 14), at(2024, 1, 1, 0, 15)),
        ("*/15 * * * *", at(2024, 1, 1, 0, 15), at(2024, 1, 1, 0, 30)),
        ("10-50/20 * * * *", at(2024, 1, 1, 0, 31), at(2024, 1, 1, 0, 50)),
        ("0,30 9 * * *", at(2024, 1, 1, 9, 0), at(2024, 1, 1, 9, 30)),
        ("0 0 1 * *", at(2024, 1, 15), at(2024, 2, 1)),
        ("0 0 29 2 *", at(2024, 3, 1), at(2028, 2, 29)),
        ("0 12 * JAN,jul *", at(2024, 2, 1), at(2024, 7, 1, 12)),
        # weekdays: 0-6 = Sun-Sat, 7 = Sun
        ("0 9 * * 1-5", SAT, at(2024, 1, 8, 9)),  # Monday, not Sunday
        ("0 9 * * 0", SAT, at(2024, 1, 7, 9)),
        ("0 9 * * 7", SAT, at(2024, 1, 7, 9)),
        ("0 9 * * 6", SAT, at(2024, 1, 13, 9)),  # 12:00 Saturday is after 9:00
        ("0 13 * * 6", SAT, at(2024, 1, 6, 13)),
        ("0 9 * * MON-FRI", SAT, at(2024, 1, 8, 9)),
        ("0 9 * * sun", SAT, at(2024, 1, 7, 9)),
        ("0 9 * * 5-7", SAT, at(2024, 1, 7, 9)),
        # macros
        ("@hourly", at(2024, 1, 1, 10, 5), at(2024, 1, 1, 11)),
        ("@daily", at(2024, 1, 1, 10), at(2024, 1, 2)),
        ("@midnight", at(2024, 1, 1, 10), at(2024, 1, 2)),
        ("@weekly", SAT, at(2024, 1, 7)),
        ("@monthly", at(2024, 1, 31), at(2024, 2, 1)),
        ("@yearly", at(2024, 6, 1), at(2025, 1, 1)),
        ("@annually", at(2024, 6, 1), at(2025, 1, 1)),
        ("  @DAILY ", at(2024, 1, 1, 10), at(2024, 1, 2)),
    ],
)
def test_next_tick(expr, after, expected):
    got = next_tick(expr, after)
    assert got == expected
    assert got.tzinfo is not None
    assert got.utcoffset() == timedelta(0)


def test_strictly_after_even_on_a_tick():
    t = at(2024, 1, 1, 9, 0)
    assert next_tick("0 9 * * *", t) == at(2024, 1, 2, 9)
    assert next_tick("0 9 * * *", t - timedelta(microseconds=1)) == t


def test_other_time_zones_are_converted_to_utc():
    # 10:00 at UTC+2 is 08:00 UTC; "0 9" means 09:00 UTC
    after = datetime(2024, 1, 1, 10, 0, tzinfo=timezone(timedelta(hours=2)))
    assert next_tick("0 9 * * *", after) == at(2024, 1, 1, 9)


def test_naive_datetime_rejected():
    with pytest.raises(ValueError, match="timezone-aware"):
        next_tick("* * * * *", datetime(2024, 1, 1))  # noqa: DTZ001


def test_successive_ticks_increase():
    t = SAT
    for _ in range(50):
        n = next_tick("*/7 3-5 * * 1,3,5", t)
        assert n > t
        t = n


@pytest.mark.parametrize(
    "expr", ["* * * * *", "0 0 * * 0", "0 0 * * 7", "@weekly", "0 9 1 */2 MON-FRI", "5 4 L * *"]
)
def test_validate_accepts(expr):
    validate(expr)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "expected 5 fields"),
        ("* * * *", "expected 5 fields"),
        ("0 * * * * *", "got 6"),  # no seconds or year field
        ("0 0 * * * 2024", "got 6"),
        ("60 * * * *", "bad minute field '60'"),
        ("* 24 * * *", "bad hour field '24'"),
        ("* * 0 * *", "bad day-of-month field '0'"),
        ("* * 32 * *", "bad day-of-month field"),
        ("* * * 13 *", "bad month field '13'"),
        ("* * * * 8", "bad day-of-week field '8'"),
        ("* * * * MON-", "bad day-of-week field"),
        ("* * * * 5-1", "bad day-of-week field"),
        ("*/0 * * * *", "bad minute field"),
        ("x * * * *", "bad minute field 'x'"),
        ("0 0 31 4 *", "bad day-of-month field"),
        ("@reboot", "unknown macro"),
        ("@every 5m", "unknown macro"),
    ],
)
def test_validate_rejects_naming_the_field(expr, message):
    with pytest.raises(ValueError, match="invalid cron expression") as err:
        validate(expr)
    assert message in str(err.value)


def test_next_tick_validates_too():
    with pytest.raises(ValueError, match="bad hour field"):
        next_tick("0 25 * * *", SAT)
