"""The df.retry delay (pgdurable/worker/instance.py retry_delay) and the Retry-After header
(pgdurable/steps/http_step.py retry_after_seconds)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from email.utils import format_datetime

import pytest

from pgdurable.steps.http_step import RETRY_AFTER_MAX, retry_after_seconds
from pgdurable.worker.instance import RETRY_JITTER, retry_delay

CFG = {"initial_delay_seconds": 1, "backoff": 2, "max_delay_seconds": 60}


@pytest.mark.parametrize(
    ("attempt", "base"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (10_000, 60.0)]
)
def test_exponential_capped(attempt, base):
    assert retry_delay(CFG, attempt, rnd=0.0) == base
    # jitter only shortens, by at most RETRY_JITTER
    assert retry_delay(CFG, attempt, rnd=0.999999) == pytest.approx(base * (1 - RETRY_JITTER), 1e-5)
    for _ in range(50):
        assert base * (1 - RETRY_JITTER) <= retry_delay(CFG, attempt) <= base


def test_constant_zero_and_decimal_configs():
    const = {"initial_delay_seconds": Decimal("0.5"), "backoff": 1, "max_delay_seconds": 60}
    assert [retry_delay(const, k, rnd=0.0) for k in (1, 2, 50)] == [0.5, 0.5, 0.5]
    zero = {"initial_delay_seconds": 0, "backoff": 2, "max_delay_seconds": 60}
    assert retry_delay(zero, 5, rnd=0.0) == 0.0
    capped_low = {"initial_delay_seconds": 10, "backoff": 3, "max_delay_seconds": 4}
    assert retry_delay(capped_low, 1, rnd=0.0) == 4.0
    huge = {"initial_delay_seconds": 1e-9, "backoff": 1e9, "max_delay_seconds": 1e10}
    assert retry_delay(huge, 2**31 - 1, rnd=0.0) == 1e10  # no overflow


def test_retry_after_forms():
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds("9" * 40) == float(RETRY_AFTER_MAX)
    assert retry_after_seconds("-5") is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("١٢") is None  # non-ASCII digits are not delay-seconds
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    later = format_datetime(datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    assert retry_after_seconds(later, now=now) == 30.0
    earlier = format_datetime(datetime(2029, 1, 1, tzinfo=UTC), usegmt=True)
    assert retry_after_seconds(earlier, now=now) == 0.0
