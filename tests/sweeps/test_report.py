"""``python -m blendexp.report <sweep folder>``: one table of all jobs, failed jobs with their error, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from PIL import Image

from tests.conftest import run_cli


def write_job(sweep: Path, num: int, status: str, tokens: str, metrics: dict[str, float], error: str | None = None
              ) -> None:
    """A job folder with the result.json a training job writes."""
    (sweep / str(num)).mkdir(parents=True)
    record = {"status": status, "metrics": metrics, "job_num": num, "run_dir": str(sweep / str(num)), "restarts": 0,
              "overrides": ["+experiment=expr_adapter", "model.adapter.projection=mlp",
                            f"model.adapter.num_tokens={tokens}", "trainer.max_steps=100"], "error": error}
    (sweep / str(num) / "result.json").write_text(json.dumps(record))


def test_report_tables_every_job_marks_failures_and_plots_each_metric_per_swept_value(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, "completed", "4", {"train/loss": 0.5, "eval/id_sim": 0.8})
    write_job(sweep, 1, "completed", "8", {"train/loss": 0.4, "eval/id_sim": 0.9})
    write_job(sweep, 2, "failed", "16", {}, "ValueError: shapes | do not match")
    res = run_cli("blendexp.report", str(sweep), "--out", str(tmp_path / "results"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "results"
    table = pd.read_csv(out / "report.csv")
    assert list(table["job"]) == [0, 1, 2] and list(table["status"]) == ["completed", "completed", "failed"]
    assert list(table["model.adapter.num_tokens"]) == [4, 8, 16]  # swept; the fixed overrides are no columns
    assert "model.adapter.projection" not in table and "trainer.max_steps" not in table
    assert table.loc[1, "eval/id_sim"] == 0.9 and pd.isna(table.loc[2, "train/loss"])
    markdown = (out / "report.md").read_text()
    assert "| 2 | **failed** | 16 | – | – | ValueError: shapes \\| do not match |" in markdown
    assert "3 jobs: 2 completed, 1 failed" in markdown and str(out / "report.md") in res.stdout
    plot = Image.open(out / "plots" / "model.adapter.num_tokens.png")
    assert plot.size[0] >= 400  # one panel per metric


def test_report_of_a_missing_or_empty_folder_fails_naming_it(tmp_path: Path) -> None:
    res = run_cli("blendexp.report", str(tmp_path / "nope"))
    assert res.returncode == 1 and f"{tmp_path / 'nope'} does not exist" in res.stderr
    res = run_cli("blendexp.report", str(tmp_path))
    assert res.returncode == 1 and f"no result.json under {tmp_path}" in res.stderr
