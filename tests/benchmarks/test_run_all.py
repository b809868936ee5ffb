"""``benchmarks/run_all.py --quick`` as a user runs it: every benchmark yields a figure, and missed goals fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, goals: str = "") -> subprocess.CompletedProcess:
    """Run a benchmark script with goal overrides in ``BLENDEXP_BENCH_GOALS``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "BLENDEXP_BENCH_GOALS": goals}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=1800)


@pytest.mark.slow
def test_run_all_quick_reports_every_figure_and_fails_on_an_impossible_goal(tmp_path: Path) -> None:
    # generate_overhead's images must also match: a ratio of 0.01 is impossible, so the run must exit 1 naming it.
    result = run("run_all.py", "--quick", "--repeats", "1", "--out", str(tmp_path), goals="generate_overhead=0.01")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "generate_overhead: figure" in result.stderr and "misses the goal <= 0.01" in result.stderr
    report = json.loads(next(tmp_path.glob("*-quick.json")).read_text())
    names = {"train_step", "reference_mode", "generate_overhead", "datamodule_throughput", "cached_latents",
             "build_workers"}
    assert {r["name"] for r in report["results"]} == names
    for r in report["results"]:
        assert r["figure"] > 0 and r["goal"], r
    over = next(r for r in report["results"] if r["name"] == "generate_overhead")
    assert not over["passed"] and over["goal"] == "<= 0.01"
    assert "same images" in over["detail"] and not any("differ" in p for p in over["problems"])
    table = next(tmp_path.glob("*-quick.md")).read_text()
    assert all(f"| {n} (" in table for n in names) and "torch threads" in table and "load average" in table


@pytest.mark.slow
def test_check_exits_1_naming_figure_and_goal_only_when_the_goal_is_missed() -> None:
    missed = run("datamodule_throughput.py", "--quick", "--repeats", "1", "--check",
                 goals="datamodule_throughput=1000")
    assert missed.returncode == 1, missed.stdout + missed.stderr
    assert "FAIL datamodule_throughput: figure" in missed.stderr and "misses the goal >= 1000" in missed.stderr
    met = run("datamodule_throughput.py", "--quick", "--repeats", "1", "--check", goals="datamodule_throughput=0.001")
    assert met.returncode == 0, met.stdout + met.stderr
    assert "datamodule_throughput:" in met.stdout and "pass" in met.stdout
