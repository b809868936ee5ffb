"""``result.json`` of a job killed without a word: "running" with its process gone is reported and marked
"interrupted"; a live job stays "running"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests.conftest import run_cli


def write_job(sweep: Path, num: int, status: str, pid: int) -> Path:
    """A job folder holding the record a training job on this host with process ``pid`` writes."""
    path = sweep / str(num) / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"status": status, "metrics": {"train/loss": 0.5} if status == "completed" else {},
                                "overrides": [f"seed={num}"], "error": None, "host": socket.gethostname(),
                                "pid": pid, "started": "2026-01-01T00:00:00"}))
    return path


def test_report_marks_a_killed_job_interrupted(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sweep = tmp_path / "sweep"
    killed = write_job(sweep, 0, "running", int(ended.stdout))
    live = write_job(sweep, 1, "running", os.getpid())
    write_job(sweep, 2, "completed", int(ended.stdout))
    res = run_cli("blendexp.report", str(sweep))
    assert res.returncode == 0, res.stderr[-3000:]
    assert list(pd.read_csv(sweep / "report.csv")["status"]) == ["interrupted", "running", "completed"]
    assert "1 interrupted" in res.stdout
    assert json.loads(killed.read_text())["status"] == "interrupted"  # on disk too, for every later reader
    assert json.loads(live.read_text())["status"] == "running"
