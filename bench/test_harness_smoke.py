"""The harness end to end at the smallest scale, so ``python -m bench`` cannot rot.

Runs every workload (W1-W4) on an embedded PostgreSQL 18 with a real ``serve``
subprocess and checks the table came out with every instance finished. Figures at
this scale mean nothing; the point is that the code path works.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench import harness
from bench.common import process_clock

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


def test_a_new_process_starts_after_the_process_clock() -> None:
    """The harness counts a backend's CPU when it started after the drain began, judged by
    psutil's ``create_time()``: the reference must be on that clock. ``time.time()`` drifts
    from it (by a second on this VM), and serve's first backends were then left out."""
    before = process_clock()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    try:
        started = psutil.Process(child.pid).create_time()
    finally:
        child.kill()
        child.wait()
    # create_time counts clock ticks (1/100 s): it may read up to one tick early
    assert started >= before - 0.011, (started, before)
    assert started - before < 1.0, (started, before)
