"""The harness end to end at the smallest scale, so ``python -m bench`` cannot rot.

Runs every workload (W1-W4) on an embedded PostgreSQL 18 with a real ``serve``
subprocess and checks the table came out with every instance finished. Figures at
this scale mean nothing; the point is that the code path works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import harness

pytestmark = pytest.mark.benchmark


def test_harness_smallest_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = harness.main(
        [
            "--scale",
            "0.0001",
            "--floor-seconds",
            "0.2",
            "--probe-gap",
            "0",
            "--stall-seconds",
            "40",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [w["workload"] for w in data["workloads"]] == ["W1", "W2", "W3", "W4"], table
    for w in data["workloads"]:
        assert w["instances"] >= 1, table
        assert w["failed"] == 0, table
        assert w["steps"] >= w["instances"], table
        assert w["steps_per_s"] > 0, table
    assert len(data["floor"]) == 4
    assert "| W1 10,000 one-step workflows |" in table
    assert rc == 0, table
