"""top: the frame is a pure function of a TopState."""

from __future__ import annotations

from pgdurable.top import TopState, render


def state(**kw):
    base = dict(
        taken_at="2025-01-01T12:00:00+00:00",
        database="app",
        counts={"pending": 1, "running": 2, "completed": 30, "failed": 1, "cancelled": 0},
        steps_per_min=120,
        failed_steps_per_min=1,
        finished_per_min=31,
    )
    base.update(kw)
    return TopState(**base)


def test_empty_sections():
    out = render(state()).splitlines()
    assert out[0] == "pgdurable top — app — 2025-01-01T12:00:00+00:00"
    assert out[2] == (
        "instances  pending 1  running 2  completed 30  failed 1  cancelled 0  total 34"
    )
    assert out[3] == ("last 1 min  steps completed 120  steps failed 1  instances finished 31")
    assert "in-flight steps (0)" in out
    assert "  (none)" in out
    assert "  (none: is `pgdurable serve` running?)" in out


def test_rows_are_cut_to_width():
    s = state(
        inflight=[
            {
                "instance_id": "abcd1234",
                "node_id": "00000001",
                "node_type": "SQL",
                "label": "",
                "seconds": 75.0,
                "query": "select pg_sleep(100), " + "x" * 200,
            }
        ],
        workers=[
            {
                "host": "h1",
                "pid": 42,
                "version": "0.1.0",
                "in_flight": 3,
                "seen_seconds_ago": 1.0,
                "up_seconds": 7300.0,
            },
            {
                "host": "h2",
                "pid": 43,
                "version": "0.1.0",
                "in_flight": 0,
                "seen_seconds_ago": 45.0,
                "up_seconds": 50.0,
            },
        ],
        failures=[
            {
                "instance_id": "ffff0000",
                "label": "nightly",
                "at": None,
                "node_type": "SQL",
                "error": "division by zero",
            }
        ],
    )
    out = render(s, width=80)
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    row = next(line for line in lines if line.startswith("  abcd1234"))
    assert "  1m15s  select pg_sleep(100), xxx" in row
    assert row.endswith("…")
    assert any("h1" in line and "2h01m" in line for line in lines)
    assert any("h2" in line and "(stale)" in line for line in lines)
    assert "  ffff0000  nightly         SQL: division by zero" in lines
    assert "workers (2)" in lines
    assert "recent failures (1)" in lines
