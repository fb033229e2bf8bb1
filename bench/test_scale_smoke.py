"""The scale checks end to end at a tiny scale, so ``python -m bench.scale`` cannot rot.

Runs finished, scaleout and memory on an embedded PostgreSQL 18 with real ``serve``
subprocesses at scale 0.002 (2,000 cloned finished instances, 2 ten-step sequences per
run, 20 parked instances) and checks outcomes, not timing targets: every step ran exactly
once (the scale-out ledger), the clones landed and were not pruned, every parked instance
parked and then finished after its signal, and the figures are positive. The flood check
runs at scale 0.001 (100 starts in one transaction, 10 signals in one statement): every
start and every signal ran its step exactly once, every probe completed, the service's
sessions stayed within its pools.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import scale

pytestmark = pytest.mark.benchmark


def test_scale_checks_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scale.json"
    rc = scale.main(
        [
            "--scale",
            "0.002",
            "--repeats",
            "1",
            "--stall-seconds",
            "30",
            "--timeout",
            "120",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["problems"] == [], table

    fin = data["finished"]
    assert fin["finished"] >= 2000, table  # clones + the six templates
    assert fin["node_rows"] > fin["finished"], table
    assert fin["pruned"] == 0, table
    assert fin["templates"] == {
        "one step": "completed",
        "ten steps": "completed",
        "named results": "completed",
        "signal wait": "completed",
        "failed": "failed",
        "cancelled": "cancelled",
    }, table
    assert len(fin["control"]) == len(fin["after"]) == 1, table
    for run in fin["before"] + fin["control"] + fin["after"]:
        assert run["failed"] == 0, table
        assert run["steps"] == 10 * run["instances"] > 0, table
        assert run["steps_per_s"] > 0, table
    for key in ("rate_before", "rate_after", "rate_control", "ratio", "control_ratio"):
        assert fin[key] > 0, (key, table)

    so = data["scaleout"]
    per_run = so["instances"]
    assert [r["serves"] for r in so["one"] + so["two"]] == [1, 2], table
    assert so["expected_rows"] == 2 * 10 * per_run, table
    assert so["ledger_rows"] == so["distinct_rows"] == so["expected_rows"], table
    assert so["duplicates"] == 0, table
    assert so["missing"] == 0, table
    # every ledger row of the 2-serve run came from a worker of one of the two serves
    assert sum(so["steps_by_serve"]) == 10 * per_run, table
    for key in ("rate_one", "rate_two", "ratio"):
        assert so[key] > 0, (key, table)
    assert all(len(r["worker_pids"]) == r["serves"] for r in so["one"] + so["two"]), table

    mem = data["memory"]
    assert mem["parked"] == mem["instances"] == 20, table
    assert mem["completed"] == mem["instances"], table
    assert len(mem["rss_parked_mb"]) == mem["workers"] == 1, table
    assert all(v > 0 for v in mem["rss_parked_mb"]), table
    assert mem["max_rss_mb"] > 0, table

    assert "| finished | ratio, after ÷ interleaved control (best / median) |" in table
    assert "| scaleout | steps run twice / never | 0 / 0 |" in table
    assert rc == 0, table


def test_graph_and_loop_checks_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "limits.json"
    args = ["--checks", "graph,loop", "--scale", "0.005", "--quiet", "--timeout", "120"]
    rc = scale.main([*args, "--json", str(out)])
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["problems"] == [], table
    assert rc == 0, table
    graph, loop = data["graph"], data["loop"]
    assert graph["status"] == "completed", table
    assert graph["nodes"] == 49, table
    assert 0 < graph["peak_rss_mb"] < 150, table
    assert loop["status"] == "completed", table
    assert loop["iterations"] == 500, table
    assert loop["per_s"] > 0, table
    assert loop["node_rows"] < 20, table


def test_flood_check_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "flood.json"
    args = ["--checks", "flood", "--scale", "0.001", "--quiet", "--timeout", "120"]
    rc = scale.main([*args, "--stall-seconds", "30", "--json", str(out)])
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["problems"] == [], table
    assert rc == 0, table
    fl = data["flood"]
    for name, n in (("starts", 100), ("signals", 10)):
        ph = fl[name]
        assert ph["instances"] == n, table
        assert ph["completed"] == ph["ledger_rows"] == ph["ledger_distinct"] == n, table
        assert ph["drain_s"] > 0, table
        assert ph["burst_s"] > 0, table
        assert ph["probes"] == ph["probes_completed"] > 0, table
        assert 0 < ph["probe_p50_s"] <= ph["probe_p99_s"] <= ph["probe_max_s"], table
    assert fl["signals_left"] == 0, table
    assert len(fl["peak_rss_mb"]) == fl["workers"] == 2, table
    assert 0 < fl["max_rss_mb"] < 150, table
    for role, bound in fl["pool_bound"].items():
        assert 0 < fl["peak_conns"][role] <= bound, (role, table)
    assert "| signals | signals left in the inbox | 0 | 0 | pass |" in table
